package ima

import (
	"bytes"
	"crypto"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// TestTemplates parses one entry of each template, checks the decoded fields
// and the ascii line (written out by hand from the kernel's
// ima_ascii_measurements_show and field_show functions), and re-marshals it.
func TestTemplates(t *testing.T) {
	d32 := seq(32, 0x10)
	d20 := seq(20, 0xa0)
	x := func(b []byte) string { return hex.EncodeToString(b) }
	sha1hex := func(b []byte) string { s := sha1.Sum(b); return x(s[:]) }
	u16 := binary.LittleEndian.AppendUint16(nil, 0o100755)
	u32 := binary.LittleEndian.AppendUint32(nil, 1000)
	u64 := binary.LittleEndian.AppendUint64(nil, 1<<40)

	type tc struct {
		name   string
		pcr    uint32
		tmpl   string
		data   []byte
		legacy bool // build the legacy "ima" wire form from digest d20 and path
		want   Fields
		ascii  string // after "<pcr> <hash> <template>"
	}
	sig := seq(9, 0x30)
	buf := []byte("root=/dev/vda1 ro")
	modsig := seq(40, 0x60)
	tests := []tc{
		{name: "legacy ima", pcr: 10, tmpl: "ima", legacy: true,
			want:  Fields{DigestAlg: "sha1", Digest: d20, Path: "/bin/sh", Raw: []Field{{"d", d20}, {"n", []byte("/bin/sh")}}},
			ascii: " " + x(d20) + " /bin/sh"},
		{name: "ima-ng", pcr: 10, tmpl: "ima-ng", data: fields(dng("sha256", d32), cstr("/usr/bin/env")),
			want:  Fields{DigestAlg: "sha256", Digest: d32, Path: "/usr/bin/env", Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("/usr/bin/env")}}},
			ascii: " sha256:" + x(d32) + " /usr/bin/env"},
		{name: "ima-ng pcr 9", pcr: 9, tmpl: "ima-ng", data: fields(dng("sha1", d20), cstr("/x")),
			want:  Fields{DigestAlg: "sha1", Digest: d20, Path: "/x", Raw: []Field{{"d-ng", dng("sha1", d20)}, {"n-ng", cstr("/x")}}},
			ascii: " sha1:" + x(d20) + " /x"},
		{name: "ima-sig unsigned", pcr: 10, tmpl: "ima-sig", data: fields(dng("sha512", seq(64, 0)), cstr("/x"), nil),
			want:  Fields{DigestAlg: "sha512", Digest: seq(64, 0), Path: "/x", Raw: []Field{{"d-ng", dng("sha512", seq(64, 0))}, {"n-ng", cstr("/x")}, {"sig", []byte{}}}},
			ascii: " sha512:" + x(seq(64, 0)) + " /x "},
		{name: "ima-sig signed", pcr: 10, tmpl: "ima-sig", data: fields(dng("sha256", d32), cstr("/x"), sig),
			want:  Fields{DigestAlg: "sha256", Digest: d32, Path: "/x", Sig: sig, Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("/x")}, {"sig", sig}}},
			ascii: " sha256:" + x(d32) + " /x " + x(sig)},
		{name: "ima-buf", pcr: 10, tmpl: "ima-buf", data: fields(dng("sha256", d32), cstr("kexec-cmdline"), buf),
			want:  Fields{DigestAlg: "sha256", Digest: d32, Path: "kexec-cmdline", Buf: buf, Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("kexec-cmdline")}, {"buf", buf}}},
			ascii: " sha256:" + x(d32) + " kexec-cmdline " + x(buf)},
		{name: "ima-modsig without modsig", pcr: 10, tmpl: "ima-modsig", data: fields(dng("sha256", d32), cstr("/x"), nil, nil, nil),
			want:  Fields{DigestAlg: "sha256", Digest: d32, Path: "/x", Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("/x")}, {"sig", []byte{}}, {"d-modsig", []byte{}}, {"modsig", []byte{}}}},
			ascii: " sha256:" + x(d32) + " /x   "},
		{name: "ima-modsig", pcr: 10, tmpl: "ima-modsig", data: fields(dng("sha256", d32), cstr("/lib/modules/m.ko"), sig, dng("sha512", seq(64, 1)), modsig),
			want: Fields{DigestAlg: "sha256", Digest: d32, Path: "/lib/modules/m.ko", Sig: sig, ModsigDigestAlg: "sha512", ModsigDigest: seq(64, 1), Modsig: modsig,
				Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("/lib/modules/m.ko")}, {"sig", sig}, {"d-modsig", dng("sha512", seq(64, 1))}, {"modsig", modsig}}},
			ascii: " sha256:" + x(d32) + " /lib/modules/m.ko " + x(sig) + " sha512:" + x(seq(64, 1)) + " " + x(modsig)},
		{name: "ima-ngv2", pcr: 10, tmpl: "ima-ngv2", data: fields(dng("ima:sha256", d32), cstr("/x")),
			want:  Fields{DigestType: "ima", DigestAlg: "sha256", Digest: d32, Path: "/x", Raw: []Field{{"d-ngv2", dng("ima:sha256", d32)}, {"n-ng", cstr("/x")}}},
			ascii: " ima:sha256:" + x(d32) + " /x"},
		{name: "ima-sigv2 verity", pcr: 10, tmpl: "ima-sigv2", data: fields(dng("verity:sha256", d32), cstr("/x"), sig),
			want:  Fields{DigestType: "verity", DigestAlg: "sha256", Digest: d32, Path: "/x", Sig: sig, Raw: []Field{{"d-ngv2", dng("verity:sha256", d32)}, {"n-ng", cstr("/x")}, {"sig", sig}}},
			ascii: " verity:sha256:" + x(d32) + " /x " + x(sig)},
		{name: "evm-sig", pcr: 10, tmpl: "evm-sig",
			data: fields(dng("sha256", d32), cstr("/x"), nil, []byte("security.ima|security.evm"), []byte{1, 2}, []byte{3, 4}, u32, u32, u16),
			want: Fields{DigestAlg: "sha256", Digest: d32, Path: "/x", Raw: []Field{{"d-ng", dng("sha256", d32)}, {"n-ng", cstr("/x")}, {"evmsig", []byte{}},
				{"xattrnames", []byte("security.ima|security.evm")}, {"xattrlengths", []byte{1, 2}}, {"xattrvalues", []byte{3, 4}}, {"iuid", u32}, {"igid", u32}, {"imode", u16}}},
			ascii: " sha256:" + x(d32) + " /x  security.ima|security.evm 0102 0304 1000 1000 33261"},
		{name: "custom d-ng|n-ng|iuid", pcr: 11, tmpl: "d-ng|n-ng|iuid", data: fields(dng("sha384", seq(48, 0)), cstr("/x"), u64),
			want:  Fields{DigestAlg: "sha384", Digest: seq(48, 0), Path: "/x", Raw: []Field{{"d-ng", dng("sha384", seq(48, 0))}, {"n-ng", cstr("/x")}, {"iuid", u64}}},
			ascii: " sha384:" + x(seq(48, 0)) + " /x 1099511627776"},
		{name: "custom d|n is not legacy", pcr: 10, tmpl: "d|n", data: fields(d20, cstr("/x")),
			want:  Fields{DigestAlg: "sha1", Digest: d20, Path: "/x", Raw: []Field{{"d", d20}, {"n", cstr("/x")}}},
			ascii: " " + x(d20) + " /x"},
		{name: "unknown template, fields", pcr: 10, tmpl: "future-tmpl", data: fields([]byte{1}, nil, []byte{2, 3}),
			want: Fields{}, ascii: " 01  0203"},
		{name: "unknown template, opaque", pcr: 10, tmpl: "d-ng|n-ng|newfield", data: []byte{1, 2, 3},
			want: Fields{}, ascii: " 010203"},
		{name: "unknown template, empty", pcr: 10, tmpl: "X", data: nil, want: Fields{}, ascii: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var in []byte
			if tc.legacy {
				in = legacyEntry(tc.pcr, d20, "/bin/sh")
			} else {
				in = entryOf(tc.pcr, tc.tmpl, tc.data)
			}
			es, err := ParseList(in)
			if err != nil {
				t.Fatal(err)
			}
			e := es[0]
			if e.PCR != tc.pcr || e.TemplateName != tc.tmpl {
				t.Errorf("pcr %d template %q", e.PCR, e.TemplateName)
			}
			if !reflect.DeepEqual(e.Fields, tc.want) {
				t.Errorf("fields\n got %+v\nwant %+v", e.Fields, tc.want)
			}
			if KnownTemplate(tc.tmpl) != (tc.want.Raw != nil) {
				t.Errorf("KnownTemplate(%q) = %v", tc.tmpl, KnownTemplate(tc.tmpl))
			}
			pcrCol := itoa(tc.pcr) // the kernel's "%2d": right-aligned in two columns
			if len(pcrCol) == 1 {
				pcrCol = " " + pcrCol
			}
			wantLine := pcrCol + " " + x(e.TemplateHash) + " " + tc.tmpl + tc.ascii + "\n"
			if got := e.ASCII(); got != wantLine {
				t.Errorf("ASCII\n got %q\nwant %q", got, wantLine)
			}
			if err := e.VerifyTemplateHash(); err != nil {
				t.Error(err)
			}
			if !tc.legacy && e.TemplateHash != nil && x(e.TemplateHash) != sha1hex(tc.data) {
				t.Errorf("template hash %x", e.TemplateHash)
			}
			out, err := e.MarshalBinary()
			if err != nil || !bytes.Equal(out, in) {
				t.Errorf("MarshalBinary: %v\n got %x\nwant %x", err, out, in)
			}
			if e.BinarySize() != len(in) {
				t.Errorf("BinarySize %d, want %d", e.BinarySize(), len(in))
			}
		})
	}
}

func itoa(v uint32) string {
	if v < 10 {
		return string(rune('0' + v))
	}
	return string(rune('0'+v/10)) + string(rune('0'+v%10))
}

func TestLegacyTemplateDigest(t *testing.T) {
	digest := seq(20, 0x77)
	name := strings.Repeat("n", MaxEventNameLen) // the longest name: 255 bytes + NUL fill the field
	in := legacyEntry(10, digest, name)
	es := mustParse(t, in)
	e := es[0]
	var pad [256]byte
	copy(pad[:], name)
	want := sha256.Sum256(append(append([]byte(nil), digest...), pad[:]...))
	if got := e.TemplateDigest(crypto.SHA256); !bytes.Equal(got, want[:]) {
		t.Errorf("sha256 template digest %x, want %x", got, want)
	}
	if err := e.VerifyTemplateHash(); err != nil {
		t.Error(err)
	}
	// The binary form carries no template data length and no NUL.
	if len(in) != 4+20+4+3+20+4+len(name) || e.BinarySize() != len(in) {
		t.Errorf("legacy entry of %d bytes, BinarySize %d", len(in), e.BinarySize())
	}
	bad := e
	bad.TemplateData = bad.TemplateData[:30]
	if bad.TemplateDigest(crypto.SHA1) != nil {
		t.Error("TemplateDigest of malformed legacy data is not nil")
	}
}

func TestViolation(t *testing.T) {
	// A 6.1 kernel logs a violation with a zero template hash and, in the
	// d-ng field, the algorithm name followed by 20 zero bytes whatever the
	// algorithm (IMA_DIGEST_SIZE); newer kernels use the algorithm's size.
	for _, dsize := range []int{20, 32} {
		data := fields(dng("sha256", make([]byte, dsize)), cstr("/var/log/x"), nil)
		in := rawEntry(10, make([]byte, 20), 7, "ima-sig", int64(len(data)), data)
		in = append(in, entryOf(10, "ima-ng", fields(dng("sha256", seq(32, 0)), cstr("/y")))...)
		es := mustParse(t, in)
		v := es[0]
		if !v.IsViolation() || es[1].IsViolation() {
			t.Fatalf("IsViolation: %v %v", v.IsViolation(), es[1].IsViolation())
		}
		if err := v.VerifyTemplateHash(); err != nil {
			t.Error(err)
		}
		if got := v.TemplateDigest(crypto.SHA256); !bytes.Equal(got, make([]byte, 32)) {
			t.Errorf("violation template digest %x, want zeros", got)
		}
		for _, bank := range []crypto.Hash{crypto.SHA1, crypto.SHA256, crypto.SHA384} {
			ff := bytes.Repeat([]byte{0xff}, bank.Size())
			if got := v.ExtendDigest(bank); !bytes.Equal(got, ff) {
				t.Errorf("%v: violation extend %x", bank, got)
			}
			h := bank.New()
			h.Write(make([]byte, bank.Size()))
			h.Write(ff)
			p := h.Sum(nil)
			h.Reset()
			h.Write(p)
			h.Write(es[1].TemplateDigest(bank))
			if got := Replay(es, bank); !bytes.Equal(got, h.Sum(nil)) {
				t.Errorf("%v: replay %x, want %x", bank, got, h.Sum(nil))
			}
		}
		if got, want := v.ASCII(), "10 "+strings.Repeat("0", 40)+" ima-sig sha256:"+strings.Repeat("00", dsize)+" /var/log/x \n"; got != want {
			t.Errorf("ASCII %q, want %q", got, want)
		}
	}
}

func TestVerifyTemplateHashMismatch(t *testing.T) {
	e := NewIMANG(10, "sha256", seq(32, 0), "/x")
	e.TemplateHash = append([]byte(nil), e.TemplateHash...)
	e.TemplateHash[0] ^= 1
	if err := e.VerifyTemplateHash(); err == nil || !strings.Contains(err.Error(), "mismatch") {
		t.Errorf("tampered hash: %v", err)
	}
	e.TemplateHash = make([]byte, 21)
	e.TemplateHash[0] = 1
	if err := e.VerifyTemplateHash(); err == nil {
		t.Error("21-byte hash accepted")
	}
}

func TestBuilders(t *testing.T) {
	d := seq(32, 0x55)
	e := NewIMANG(10, "sha256", d, "/opt/my app/run")
	if e.TemplateName != "ima-ng" || e.Fields.Path != "/opt/my_app/run" || e.Fields.DigestAlg != "sha256" || !bytes.Equal(e.Fields.Digest, d) {
		t.Errorf("NewIMANG: %+v", e)
	}
	wantData := fields(dng("sha256", d), cstr("/opt/my_app/run"))
	if !bytes.Equal(e.TemplateData, wantData) {
		t.Errorf("template data %x, want %x", e.TemplateData, wantData)
	}
	sum := sha1.Sum(wantData)
	if !bytes.Equal(e.TemplateHash, sum[:]) {
		t.Errorf("template hash %x, want %x", e.TemplateHash, sum)
	}
	if got, want := e.ASCII(), "10 "+hex.EncodeToString(sum[:])+" ima-ng sha256:"+hex.EncodeToString(d)+" /opt/my_app/run\n"; got != want {
		t.Errorf("ASCII %q, want %q", got, want)
	}

	for _, b := range []Entry{
		e,
		NewIMANG(10, "sha256\x00junk", d, "/a\x00b"),
		NewIMASig(10, "sha256", d, "/x", nil),
		NewIMASig(10, "sha256", d, "/x", []byte{}),
		NewIMASig(12, "sha1", seq(20, 0), "/y", seq(100, 0)),
	} {
		bin, err := b.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		es := mustParse(t, bin)
		if len(es) != 1 || !es[0].Equal(b) || !reflect.DeepEqual(es[0].Fields, b.Fields) {
			t.Errorf("builder entry does not round-trip:\n got %+v\nwant %+v", es[0], b)
		}
	}
	if e := NewIMANG(10, "sha256\x00junk", d, "/a\x00b"); e.Fields.DigestAlg != "sha256" || e.Fields.Path != "/a" {
		t.Errorf("C-string handling: alg %q path %q", e.Fields.DigestAlg, e.Fields.Path)
	}
}

func TestAlgNames(t *testing.T) {
	for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA256, crypto.SHA384, crypto.SHA512, crypto.MD5, crypto.SHA224, crypto.SHA3_256} {
		if AlgHash(AlgName(h)) != h {
			t.Errorf("%v: AlgName %q does not map back", h, AlgName(h))
		}
	}
	if AlgName(crypto.SHA256) != "sha256" || AlgHash("sm3") != 0 || AlgName(crypto.RIPEMD160) != "" {
		t.Error("unexpected name mapping")
	}
}

func TestReplayOtherPCRs(t *testing.T) {
	a := NewIMANG(10, "sha256", seq(32, 0), "/a")
	b := NewIMANG(11, "sha256", seq(32, 1), "/b")
	only10 := Replay([]Entry{a}, crypto.SHA256)
	if got := Replay([]Entry{a, b}, crypto.SHA256); !bytes.Equal(got, only10) {
		t.Error("Replay folded an entry for PCR 11")
	}
	if got := ReplayPCR([]Entry{a, b}, 11, crypto.SHA256); !bytes.Equal(got, Replay([]Entry{{PCR: 10, TemplateHash: b.TemplateHash, TemplateName: b.TemplateName, TemplateData: b.TemplateData}}, crypto.SHA256)) {
		t.Error("ReplayPCR(11) differs from the replay of b alone")
	}
	if got := Replay(nil, crypto.SHA384); !bytes.Equal(got, make([]byte, 48)) {
		t.Errorf("empty replay %x", got)
	}
}

func TestDecodeTemplate(t *testing.T) {
	d32 := seq(32, 0x10)
	f, err := DecodeTemplate("ima-sig", fields(dng("sha256", d32), cstr("/x"), []byte{3, 2}))
	if err != nil || f.Path != "/x" || !bytes.Equal(f.Digest, d32) || !bytes.Equal(f.Sig, []byte{3, 2}) {
		t.Fatalf("DecodeTemplate: %+v, %v", f, err)
	}
	if _, err := DecodeTemplate("ima-sig", fields(dng("sha256", d32))); !errors.Is(err, ErrInvalid) {
		t.Errorf("missing fields: %v, want ErrInvalid", err)
	}
	if _, err := DecodeTemplate("no-such-template", nil); err == nil {
		t.Error("unknown template: no error")
	}
	// The legacy template's data is its wire form (digest, u32 length, name).
	es := mustParse(t, legacyEntry(10, seq(20, 0), "/bin/sh"))
	if f, err := DecodeTemplate("ima", es[0].TemplateData); err != nil || f.Path != "/bin/sh" {
		t.Errorf("legacy: %+v, %v", f, err)
	}
}
