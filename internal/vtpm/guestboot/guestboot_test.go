package guestboot

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/ima"
)

// cpioFile is one entry of a parsed newc archive.
type cpioFile struct {
	mode         uint32
	major, minor uint64
	data         []byte
}

// parseNewc reads a newc cpio archive independently of cpioWriter: the
// 110-byte ASCII header, the NUL-terminated name and the data, each padded
// to 4 bytes, up to TRAILER!!!.
func parseNewc(t *testing.T, b []byte) map[string]cpioFile {
	t.Helper()
	files := map[string]cpioFile{}
	off := 0
	for {
		if off+110 > len(b) {
			t.Fatalf("archive ends at %d inside a header", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			t.Fatalf("header at %d: magic %q", off, h[:6])
		}
		field := func(i int) uint64 {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("header at %d, field %d: %v", off, i, err)
			}
			return v
		}
		mode, size, major, minor, nameSize := field(1), field(6), field(9), field(10), field(11)
		nameEnd := off + 110 + int(nameSize)
		if nameSize == 0 || nameEnd > len(b) || b[nameEnd-1] != 0 {
			t.Fatalf("header at %d: bad name size %d", off, nameSize)
		}
		name := string(b[off+110 : nameEnd-1])
		dataOff := (nameEnd + 3) &^ 3
		if dataOff+int(size) > len(b) {
			t.Fatalf("%s: data past the end", name)
		}
		if name == "TRAILER!!!" {
			if end := (dataOff + int(size) + 3) &^ 3; end != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-end)
			}
			return files
		}
		if _, dup := files[name]; dup {
			t.Fatalf("%s twice", name)
		}
		files[name] = cpioFile{mode: uint32(mode), major: major, minor: minor, data: b[dataOff : dataOff+int(size)]}
		off = (dataOff + int(size) + 3) &^ 3
	}
}

func TestInitramfs(t *testing.T) {
	busybox := bytes.Repeat([]byte("busybox!"), 1001) // not a multiple of 4 with the name
	for _, tc := range []struct {
		name, init string
	}{
		{"default init", Init},
		{"other init", "#!/bin/busybox sh\necho VTPM-TEST: done\npoweroff -f\n"},
		{"odd length init", "#!/bin/busybox sh\nx"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := parseNewc(t, Initramfs(busybox, tc.init))
			want := map[string]struct {
				mode uint32
				data []byte
			}{
				"bin/busybox":    {0o100755, busybox},
				"init":           {0o100755, []byte(tc.init)},
				"etc/ima-policy": {0o100644, []byte(Policy)},
				"opt/vtpm/data":  {0o100644, []byte("data the guest reads\n")},
				"dev/console":    {0o20600, nil},
			}
			for i := 1; i <= 3; i++ {
				want[fmt.Sprintf("opt/vtpm/tool-%d", i)] = struct {
					mode uint32
					data []byte
				}{0o100755, []byte(fmt.Sprintf("#!/bin/sh\necho tool-%d ran\n", i))}
			}
			for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "run", "tmp", "opt", "opt/vtpm"} {
				want[d] = struct {
					mode uint32
					data []byte
				}{0o40755, nil}
			}
			for name, w := range want {
				f, ok := files[name]
				if !ok {
					t.Errorf("%s missing", name)
					continue
				}
				if f.mode != w.mode || !bytes.Equal(f.data, w.data) {
					t.Errorf("%s: mode %o, %d bytes; want mode %o, %d bytes", name, f.mode, len(f.data), w.mode, len(w.data))
				}
			}
			if len(files) != len(want) {
				t.Errorf("%d entries, want %d", len(files), len(want))
			}
			if c := files["dev/console"]; c.major != 5 || c.minor != 1 {
				t.Errorf("dev/console is %d:%d, want 5:1", c.major, c.minor)
			}
		})
	}
}

func TestArgs(t *testing.T) {
	g := &Guest{QEMU: "/usr/bin/qemu-system-x86_64", Kernel: "/k/vmlinuz", Initrd: "/d/initrd.img"}
	base := g.Args("/d/console.log")
	for _, tc := range []struct {
		name  string
		args  []string
		pairs [][2]string // flag, value that must follow it
		not   []string    // flags that must not appear
	}{
		{"no TPM", base,
			[][2]string{{"-kernel", "/k/vmlinuz"}, {"-initrd", "/d/initrd.img"}, {"-append", Cmdline},
				{"-chardev", "file,id=con0,path=/d/console.log"}, {"-serial", "chardev:con0"}, {"-accel", "tcg"}},
			[]string{"-tpmdev"}},
		{"tpm-crb", append(slices.Clone(base), TPMArgs("/run/v/vm.sock", "tpm-crb")...),
			[][2]string{{"-chardev", "socket,id=chrtpm,path=/run/v/vm.sock"}, {"-tpmdev", "emulator,id=tpm0,chardev=chrtpm"},
				{"-device", "tpm-crb,tpmdev=tpm0"}, {"-kernel", "/k/vmlinuz"}}, nil},
		{"tpm-tis", TPMArgs("/s/swtpm.sock", "tpm-tis"),
			[][2]string{{"-chardev", "socket,id=chrtpm,path=/s/swtpm.sock"}, {"-device", "tpm-tis,tpmdev=tpm0"}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range tc.pairs {
				found := false
				for i := 0; i+1 < len(tc.args); i++ {
					found = found || (tc.args[i] == p[0] && tc.args[i+1] == p[1])
				}
				if !found {
					t.Errorf("no %s %s in %q", p[0], p[1], tc.args)
				}
			}
			for _, f := range tc.not {
				if slices.Contains(tc.args, f) {
					t.Errorf("%s in %q", f, tc.args)
				}
			}
		})
	}
}

// console is what Init prints for a list of entries and PCR 10 values.
func console(entries []ima.Entry, pcrA, pcrB string, extra ...string) []byte {
	var list []byte
	for _, e := range entries {
		list, _ = e.AppendBinary(list)
	}
	lines := []string{"[    0.5] ima: Allocated hash algorithm: sha256", Marker + "start", Marker + "policy loaded",
		Marker + "dmesg [    0.6] tpm_crb MSFT0101:00: ready",
		Marker + "tpmcmd startup 80010000000a00000100",
		Marker + "pcr10-before-user-cmds " + pcrA,
		Marker + "pcr10-sha256 " + pcrA + " " + pcrB,
		Marker + "pcr10-sha1 00112233", Marker + "ima-begin"}
	b64 := base64.StdEncoding.EncodeToString(list)
	for len(b64) > 76 {
		lines = append(lines, Marker+"b64 "+b64[:76])
		b64 = b64[76:]
	}
	lines = append(lines, Marker+"b64 "+b64, Marker+"ima-end")
	lines = append(lines, extra...)
	lines = append(lines, DoneMarker, "[    2.0] reboot: Power down")
	return []byte(strings.Join(lines, "\r\n") + "\r\n")
}

func TestReportCheckIMA(t *testing.T) {
	agg := sha256.Sum256([]byte("PCRs 0-9"))
	good := []ima.Entry{ima.NewIMANG(10, "sha256", agg[:], "boot_aggregate")}
	for i := range 4 {
		d := sha256.Sum256([]byte{byte(i)})
		good = append(good, ima.NewIMANG(10, "sha256", d[:], fmt.Sprintf("/opt/vtpm/tool-%d", i)))
	}
	pcr := hex.EncodeToString(ima.Replay(good, crypto.SHA256))
	zeroAgg := append([]ima.Entry{ima.NewIMANG(10, "sha256", make([]byte, 32), "boot_aggregate")}, good[1:]...)
	zeroPCR := hex.EncodeToString(ima.Replay(zeroAgg, crypto.SHA256))
	other := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name    string
		console []byte
		wantErr string
	}{
		{"good", console(good, pcr, pcr), ""},
		{"no done", bytes.ReplaceAll(console(good, pcr, pcr), []byte(DoneMarker), nil), "did not finish"},
		{"bypass", console(good, pcr, pcr, Marker+"dmesg [ 0.7] ima: No TPM chip found, activating TPM-bypass!"), "TPM-bypass"},
		{"bypass outside dmesg lines", append([]byte("ima: No TPM chip found, activating TPM-bypass!\n"), console(good, pcr, pcr)...), "TPM-bypass"},
		{"pcr moved", console(good, pcr, other), "changed while"},
		{"no pcr", console(good, "", ""), "unreadable"},
		{"pcr differs from the replay", console(good, other, other), "replay of 5 IMA entries"},
		{"list without the last entry", console(good[:4], pcr, pcr), "replay of 4 IMA entries"},
		{"zero boot_aggregate", console(zeroAgg, zeroPCR, zeroPCR), "boot_aggregate is zero"},
		{"no boot_aggregate first", console(good[1:], pcr, pcr), "does not start with boot_aggregate"},
		{"empty list", console(nil, pcr, pcr), "does not start with boot_aggregate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ParseReport(tc.console)
			if err != nil {
				t.Fatal(err)
			}
			facts, err := r.CheckIMA()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("CheckIMA: %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(facts.Entries) != 5 || !bytes.Equal(facts.BootAggregate, agg[:]) || hex.EncodeToString(facts.PCR10) != pcr {
				t.Fatalf("facts: %d entries, boot_aggregate %x, PCR 10 %x", len(facts.Entries), facts.BootAggregate, facts.PCR10)
			}
			if r.TPMCmds["startup"] != "80010000000a00000100" || r.PCR10SHA1 != "00112233" || r.PCR10BeforeUserCmds != pcr || len(r.Dmesg) != 1 {
				t.Fatalf("report: %+v", r)
			}
		})
	}
	if _, err := ParseReport([]byte(Marker + "b64 !!!notbase64\n")); err == nil {
		t.Fatal("a malformed IMA list parsed")
	}
}

// FuzzReport feeds arbitrary consoles (a guest writes its console, so its
// bytes are the guest's) to ParseReport and CheckIMA: no panic, and a
// report that passes CheckIMA has a list that replays to its PCR 10.
func FuzzReport(f *testing.F) {
	agg := sha256.Sum256([]byte("PCRs 0-9"))
	good := []ima.Entry{ima.NewIMANG(10, "sha256", agg[:], "boot_aggregate")}
	pcr := hex.EncodeToString(ima.Replay(good, crypto.SHA256))
	f.Add(console(good, pcr, pcr))
	f.Add(console(nil, "", ""))
	f.Add([]byte(Marker + "b64 AAAA\n" + DoneMarker + "\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseReport(b)
		if err != nil {
			return
		}
		facts, err := r.CheckIMA()
		if err != nil {
			return
		}
		if !bytes.Equal(ima.Replay(facts.Entries, crypto.SHA256), facts.PCR10) || len(facts.BootAggregate) != 32 {
			t.Fatalf("CheckIMA passed a report whose list does not replay to its PCR 10")
		}
	})
}
