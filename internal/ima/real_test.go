package ima

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

// The tests in this file run against a real measurement list captured from a
// Debian 12 guest (kernel 6.1, ima-sig, sha256 file digests, swtpm with sha1
// and sha256 banks): testdata/guest-imasig-sha256.*.

func TestTestdataIntact(t *testing.T) {
	for name, want := range map[string]string{testBin: testBinSHA, testTxt: testTxtSHA} {
		sum := sha256.Sum256(readTestdata(t, name))
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s: sha256 %s, want %s", name, got, want)
		}
	}
}

func TestRealListParses(t *testing.T) {
	bin := readTestdata(t, testBin)
	es := mustParse(t, bin)
	if len(es) != testEntries {
		t.Fatalf("parsed %d entries, want %d", len(es), testEntries)
	}
	bounds := entryBounds(t, bin)
	for i, e := range es {
		if e.PCR != 10 || e.TemplateName != "ima-sig" || len(e.TemplateHash) != 20 {
			t.Errorf("entry %d: pcr %d template %q hash %d bytes", i, e.PCR, e.TemplateName, len(e.TemplateHash))
		}
		if e.Fields.DigestAlg != "sha256" || len(e.Fields.Digest) != 32 || e.Fields.Path == "" {
			t.Errorf("entry %d: fields %+v", i, e.Fields)
		}
		if len(e.Fields.Raw) != 3 || e.Fields.Raw[0].ID != "d-ng" || e.Fields.Raw[1].ID != "n-ng" || e.Fields.Raw[2].ID != "sig" {
			t.Errorf("entry %d: raw fields %+v", i, e.Fields.Raw)
		}
		if e.IsViolation() {
			t.Errorf("entry %d: unexpected violation", i)
		}
		if err := e.VerifyTemplateHash(); err != nil {
			t.Errorf("entry %d: %v", i, err)
		}
		if got, want := e.BinarySize(), bounds[i+1]-bounds[i]; got != want {
			t.Errorf("entry %d: BinarySize %d, want %d", i, got, want)
		}
	}
	if es[0].Fields.Path != "boot_aggregate" {
		t.Errorf("first entry is %q, want boot_aggregate", es[0].Fields.Path)
	}
}

func TestRealSignedCount(t *testing.T) {
	n := 0
	for _, e := range mustParse(t, readTestdata(t, testBin)) {
		if e.IsSigned() {
			n++
			// An IMA digital signature v2 header: type 3, version 2.
			if e.Fields.Sig[0] != 0x03 || e.Fields.Sig[1] != 0x02 {
				t.Errorf("%s: sig header % x", e.Fields.Path, e.Fields.Sig[:2])
			}
		}
	}
	if n != testSigned {
		t.Errorf("%d signed entries, want %d", n, testSigned)
	}
}

func TestRealASCIIMatchesKernel(t *testing.T) {
	es := mustParse(t, readTestdata(t, testBin))
	txt := readTestdata(t, testTxt)
	var got []byte
	for _, e := range es {
		got = e.AppendASCII(got)
	}
	if bytes.Equal(got, txt) {
		return
	}
	gl, wl := strings.SplitAfter(string(got), "\n"), strings.SplitAfter(string(txt), "\n")
	for i := range min(len(gl), len(wl)) {
		if gl[i] != wl[i] {
			t.Fatalf("line %d differs:\n got %q\nwant %q", i+1, gl[i], wl[i])
		}
	}
	t.Fatalf("ascii rendering has %d lines, kernel file %d", len(gl), len(wl))
}

func TestRealASCIIPerEntry(t *testing.T) {
	es := mustParse(t, readTestdata(t, testBin))
	lines := strings.SplitAfter(string(readTestdata(t, testTxt)), "\n")
	for i, e := range es {
		if got := e.ASCII(); got != lines[i] {
			t.Errorf("entry %d: ASCII %q, want %q", i, got, lines[i])
		}
	}
	// Unsigned entries end in a space (the empty sig field), signed ones in hex.
	if l := lines[0]; !strings.HasSuffix(l, "boot_aggregate \n") {
		t.Errorf("boot_aggregate line %q lacks the trailing space", l)
	}
}

func TestRealRoundTrip(t *testing.T) {
	bin := readTestdata(t, testBin)
	var out []byte
	for i, e := range mustParse(t, bin) {
		var err error
		if out, err = e.AppendBinary(out); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
	}
	if !bytes.Equal(out, bin) {
		t.Fatalf("re-marshalled list (%d bytes) differs from the kernel's (%d bytes)", len(out), len(bin))
	}
}

func TestRealReplay(t *testing.T) {
	es := mustParse(t, readTestdata(t, testBin))
	pcrs := testPCRValues(t)
	for _, tc := range []struct {
		bank string
		hash crypto.Hash
	}{{"sha1", crypto.SHA1}, {"sha256", crypto.SHA256}} {
		t.Run(tc.bank, func(t *testing.T) {
			got, want := Replay(es, tc.hash), pcrs[tc.bank][10]
			if !bytes.Equal(got, want) {
				t.Errorf("replay %x, PCR 10 is %x", got, want)
			}
			if got := ReplayPCR(es, 11, tc.hash); !bytes.Equal(got, make([]byte, tc.hash.Size())) {
				t.Errorf("replay of PCR 11 (no entries) %x, want zeros", got)
			}
			// Any change to any entry changes the replay.
			mod := append([]Entry(nil), es...)
			mod = append(mod[:200:200], mod[201:]...)
			if bytes.Equal(Replay(mod, tc.hash), want) {
				t.Error("replay without entry 200 still matches")
			}
		})
	}
	if got := Replay(es, crypto.MD4); got != nil {
		t.Errorf("replay with an unavailable hash: %x, want nil", got)
	}
}

func TestRealTemplateDigestMatchesColumn(t *testing.T) {
	for i, e := range mustParse(t, readTestdata(t, testBin)) {
		if got := e.TemplateDigest(crypto.SHA1); !bytes.Equal(got, e.TemplateHash) {
			t.Fatalf("entry %d: TemplateDigest(SHA1) %x, column %x", i, got, e.TemplateHash)
		}
		want := sha256.Sum256(e.TemplateData)
		if got := e.TemplateDigest(crypto.SHA256); !bytes.Equal(got, want[:]) {
			t.Fatalf("entry %d: TemplateDigest(SHA256) %x, want %x", i, got, want)
		}
	}
}

func TestRealBootAggregate(t *testing.T) {
	es := mustParse(t, readTestdata(t, testBin))
	pcrs := testPCRValues(t)
	var bank [][]byte
	for i := range 10 {
		bank = append(bank, pcrs["sha256"][i])
	}
	got, err := BootAggregate(crypto.SHA256, bank)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, es[0].Fields.Digest) {
		t.Errorf("boot aggregate %x, logged %x", got, es[0].Fields.Digest)
	}
	if _, err := BootAggregate(crypto.SHA256, bank[:9]); err == nil {
		t.Error("boot aggregate over 9 PCRs: no error")
	}
	if _, err := BootAggregate(crypto.SHA1, bank); err == nil {
		t.Error("boot aggregate with sha256 values for the sha1 bank: no error")
	}
}

// The builders reproduce every real entry byte for byte from its parts.
func TestRealBuildersReproduceKernel(t *testing.T) {
	for i, e := range mustParse(t, readTestdata(t, testBin)) {
		b := NewIMASig(e.PCR, e.Fields.DigestAlg, e.Fields.Digest, e.Fields.Path, e.Fields.Sig)
		if !b.Equal(e) {
			t.Fatalf("entry %d (%s): builder differs:\n got %x %x\nwant %x %x", i, e.Fields.Path, b.TemplateHash, b.TemplateData, e.TemplateHash, e.TemplateData)
		}
		if b.ASCII() != e.ASCII() {
			t.Fatalf("entry %d: builder ASCII %q, want %q", i, b.ASCII(), e.ASCII())
		}
	}
}

// A per-bank list (binary_runtime_measurements_sha256 of newer kernels) has a
// 32-byte template hash column; Options.TemplateHashSize reads it.
func TestSHA256Column(t *testing.T) {
	es := mustParse(t, readTestdata(t, testBin))
	var list []byte
	for _, e := range es {
		e.TemplateHash = e.TemplateDigest(crypto.SHA256)
		var err error
		if list, err = e.AppendBinary(list); err != nil {
			t.Fatal(err)
		}
	}
	got, err := ParseListOptions(list, Options{TemplateHashSize: 32})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(es) {
		t.Fatalf("%d entries, want %d", len(got), len(es))
	}
	for i := range got {
		if err := got[i].VerifyTemplateHash(); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if !bytes.Equal(got[i].TemplateData, es[i].TemplateData) {
			t.Fatalf("entry %d: data differs", i)
		}
	}
	if !bytes.Equal(Replay(got, crypto.SHA256), testPCRValues(t)["sha256"][10]) {
		t.Error("replay of the sha256-column list does not match PCR 10")
	}
	// Read with the default (SHA-1) column size, the same bytes misparse.
	if _, err := ParseList(list); err == nil {
		t.Error("sha256-column list parsed as a sha1-column list")
	}
}
