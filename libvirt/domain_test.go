package libvirt

import (
	"os"
	"strings"
	"testing"
)

func TestParseDumpXML(t *testing.T) {
	doc, err := os.ReadFile("testdata/vm-a.xml")
	if err != nil {
		t.Fatal(err)
	}
	d, err := ParseDomain(doc)
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "vm-a" || d.CID != 42 || d.SerialSocket != "/run/tpmmux/serial/vm-a.sock" || d.SerialMode != "connect" || d.Attest != "yes" {
		t.Fatalf("parsed %+v", d)
	}
	if len(d.Files) != 2 || d.Files[0].Role != "kernel" || d.Files[1].Path != "/var/lib/tpmmux-e2e/initrd-vm-a.img" {
		t.Fatalf("files %+v", d.Files)
	}
}

func TestParseRejects(t *testing.T) {
	good, _ := os.ReadFile("testdata/vm-a.xml")
	tests := []struct {
		name, from, to, want string
	}{
		{"no name", "<name>vm-a</name>", "", "no <name>"},
		{"bad uuid", "6f1c3a2e-9b7d", "zz1c3a2e-9b7d", "uuid"},
		{"host cid", "address='42'", "address='2'", "not a guest CID"},
		{"cid not a number", "address='42'", "address='x'", "not a guest CID"},
		{"bad metadata", `enabled="yes"`, `enabled="maybe"`, "want yes or no"},
		{"not xml", "<domain", "<<domain", "parse domain XML"},
		{"channel without socket", "<source mode='connect' path='/run/tpmmux/serial/vm-a.sock'>", "<source>", "not a unix socket channel"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := strings.Replace(string(good), tt.from, tt.to, 1)
			if doc == string(good) {
				t.Fatalf("mutation %q not applied", tt.from)
			}
			_, err := ParseDomain([]byte(doc))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	if _, err := ParseDomain(make([]byte, MaxDomainXML+1)); err == nil {
		t.Fatal("accepted oversize XML")
	}
}

func FuzzParseDomain(f *testing.F) {
	good, _ := os.ReadFile("testdata/vm-a.xml")
	f.Add(good)
	f.Add([]byte("<domain><name>x</name><uuid>00000000-0000-0000-0000-000000000000</uuid></domain>"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ParseDomain(b)
		if err != nil {
			return
		}
		if d.Name == "" {
			t.Fatal("accepted a domain without a name")
		}
		if d.CID != 0 && d.CID < 3 {
			t.Fatalf("accepted host CID %d", d.CID)
		}
	})
}

// TestParseExternalTPM: the external TPM backend libvirt 9.0 connects QEMU's
// TPM emulator with (docs/vtpm.md) names the VM's vTPM socket.
func TestParseExternalTPM(t *testing.T) {
	good, _ := os.ReadFile("testdata/vm-a.xml")
	tpmXML := func(path string) string {
		return "<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='" + path + "'/></backend></tpm>"
	}
	withTPM := func(devs ...string) []byte {
		return []byte(strings.Replace(string(good), "</devices>", strings.Join(devs, "")+"</devices>", 1))
	}
	d, err := ParseDomain(withTPM(tpmXML("/run/tpmmux/vtpm/vm-a.sock")))
	if err != nil || d.VTPMSocket != "/run/tpmmux/vtpm/vm-a.sock" {
		t.Fatalf("parsed %v, %+v", err, d)
	}
	if d, err := ParseDomain(good); err != nil || d.VTPMSocket != "" {
		t.Fatalf("no tpm: %v, %q", err, d.VTPMSocket)
	}
	emu := "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>"
	if d, err := ParseDomain(withTPM(emu)); err != nil || d.VTPMSocket != "" {
		t.Fatalf("swtpm emulator backend: %v, %q", err, d.VTPMSocket)
	}
	if _, err := ParseDomain(withTPM(tpmXML("/a"), tpmXML("/b"))); err == nil || !strings.Contains(err.Error(), "more than one") {
		t.Fatalf("two external TPMs: %v", err)
	}
	if _, err := ParseDomain(withTPM("<tpm model='tpm-crb'><backend type='external' version='2.0'/></tpm>")); err == nil || !strings.Contains(err.Error(), "not a unix socket") {
		t.Fatalf("external TPM without a source: %v", err)
	}
}
