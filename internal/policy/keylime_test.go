package policy

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"os"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// The real list: a Debian 12 guest, ima-sig template, sha256 file digests,
// 454 entries of which 188 carry signatures made with the key of
// testdata/ima-signing-cert.pem (copied from the shared test data).
const (
	realList    = "../ima/testdata/guest-imasig-sha256.bin"
	signingCert = "testdata/ima-signing-cert.pem"
	realEntries = 454
	realSigned  = 188
)

func realMeasurements(t *testing.T) []*record.Measurement {
	t.Helper()
	b, err := os.ReadFile(realList)
	if err != nil {
		t.Fatal(err)
	}
	es, err := ima.ParseList(b)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]*record.Measurement, len(es))
	for i, e := range es {
		out[i] = &record.Measurement{PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash,
			Template: e.TemplateName, TemplateData: e.TemplateData, LogIndex: uint64(i)}
	}
	return out
}

// keylimePolicyOf writes the runtime policy keylime-policy create runtime
// would write for the list (every path with its digest), with edits.
func keylimePolicyOf(t *testing.T, ms []*record.Measurement, edit func(p map[string]any)) *Runtime {
	t.Helper()
	digests := map[string][]string{}
	for _, m := range ms {
		f, err := ima.DecodeTemplate(m.Template, m.TemplateData)
		if err != nil {
			t.Fatal(err)
		}
		digests[f.Path] = append(digests[f.Path], hex.EncodeToString(f.Digest))
	}
	p := map[string]any{
		"meta":              map[string]any{"version": 1, "generator": 3, "timestamp": "2026-11-29 10:00:00"},
		"release":           0,
		"digests":           digests,
		"excludes":          []string{},
		"keyrings":          map[string]any{},
		"ima":               map[string]any{"ignored_keyrings": []string{}, "log_hash_alg": "sha1", "dm_policy": nil},
		"ima-buf":           map[string]any{},
		"verification-keys": "",
	}
	if edit != nil {
		edit(p)
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

func appraiseAll(a *Appraisal, ms []*record.Measurement) []verify.Violation {
	var out []verify.Violation
	for i, m := range ms {
		for _, v := range a.AppraiseMeasurement(uint64(i+1), m) {
			v.Seq = uint64(i + 1)
			out = append(out, v)
		}
	}
	return out
}

func signingKeys(t *testing.T) []Key {
	t.Helper()
	ks, err := ReadKeyFile(signingCert)
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 1 || ks[0].ID != 0x80277e5c {
		t.Fatalf("keys %+v: want one with key id 80277e5c (the last 4 bytes of the certificate's SKID)", ks)
	}
	return ks
}

// The real list against the policy Keylime's tool would write for it: no
// violation, and all 188 signatures verify with the signing certificate.
func TestRealListSignatures(t *testing.T) {
	ms := realMeasurements(t)
	if len(ms) != realEntries {
		t.Fatalf("%d entries", len(ms))
	}
	rt := keylimePolicyOf(t, ms, nil)
	a := New(rt, signingKeys(t))
	if v := appraiseAll(a, ms); len(v) != 0 {
		t.Fatalf("%d violations, first %+v", len(v), v[0])
	}
	rep := a.Report()
	s := rep.Signatures
	if s.Signed != realSigned || s.Verified != realSigned || s.Unverified != 0 || len(s.Entries) != realSigned {
		t.Fatalf("signatures: signed %d verified %d unverified %d", s.Signed, s.Verified, s.Unverified)
	}
	for _, e := range s.Entries {
		if e.KeyID != "80277e5c" || e.HashAlg != "sha256" || e.Status != StatusVerified || e.Path == "" {
			t.Fatalf("entry %+v", e)
		}
	}
	if rep.Appraised != realEntries || rep.Excluded != 0 || rep.Policy == "" || rep.LogHashAlg != "sha1" {
		t.Fatalf("report %+v", rep)
	}

	// Without the key the signatures are reported unverified and the
	// entries fall back to their digests (Keylime's _validate_ima_sig).
	a = New(rt, nil)
	if v := appraiseAll(a, ms); len(v) != 0 {
		t.Fatalf("without keys: %d violations", len(v))
	}
	if s := a.Report().Signatures; s.Verified != 0 || s.Unverified != realSigned || s.Entries[0].Status != StatusNoKey {
		t.Fatalf("without keys: %+v", s)
	}

	// A signature-only policy (no digests): signed files pass on their
	// signatures, unsigned ones violate; a tampered signature is rejected.
	sigOnly := keylimePolicyOf(t, ms, func(p map[string]any) { p["digests"] = map[string]any{} })
	a = New(sigOnly, signingKeys(t))
	v := appraiseAll(a, ms)
	// boot_aggregate, unsigned and not listed, is skipped (see the package
	// documentation); every other unsigned entry violates.
	if len(v) != realEntries-realSigned-1 {
		t.Fatalf("signature-only policy: %d violations, want %d (the unsigned entries but boot_aggregate)", len(v), realEntries-realSigned-1)
	}
	var signed *record.Measurement
	for _, m := range ms {
		f, _ := ima.DecodeTemplate(m.Template, m.TemplateData)
		if len(f.Sig) > 0 {
			signed = m
			break
		}
	}
	bad := tamperSig(t, signed)
	a = New(sigOnly, signingKeys(t))
	v = a.AppraiseMeasurement(1, bad)
	if len(v) != 1 || v[0].Reason != "path not in policy" {
		t.Fatalf("tampered signature: %+v", v)
	}
	if e := a.Report().Signatures.Entries[0]; e.Status != StatusBad {
		t.Fatalf("tampered signature status %q", e.Status)
	}
}

// tamperSig flips a bit of an entry's signature (and fixes its template
// hash so that only the signature is wrong).
func tamperSig(t *testing.T, m *record.Measurement) *record.Measurement {
	t.Helper()
	f, err := ima.DecodeTemplate(m.Template, m.TemplateData)
	if err != nil {
		t.Fatal(err)
	}
	sig := bytes.Clone(f.Sig)
	sig[len(sig)-1] ^= 1
	data := bytes.Replace(m.TemplateData, f.Sig, sig, 1)
	h := sha1.Sum(data)
	c := *m
	c.TemplateData, c.TemplateHash = data, h[:]
	return &c
}

// keyEntry is an ima-buf measurement of a key loaded onto keyring (what
// the kernel logs with "measure func=KEY_CHECK").
func keyEntry(t *testing.T, keyring string, der []byte) *record.Measurement {
	t.Helper()
	d := sha256.Sum256(der)
	var data []byte
	field := func(b []byte) {
		var n [4]byte
		n[0], n[1], n[2], n[3] = byte(len(b)), byte(len(b)>>8), byte(len(b)>>16), byte(len(b)>>24)
		data = append(data, n[:]...)
		data = append(data, b...)
	}
	field(append([]byte("sha256:\x00"), d[:]...))
	field(append([]byte(keyring), 0))
	field(der)
	h := sha1.Sum(data)
	return &record.Measurement{PCR: 10, TemplateHashAlg: "sha1", TemplateHash: h[:], Template: "ima-buf", TemplateData: data}
}

func certDER(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(signingCert)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	return blk.Bytes
}

// A key the guest loads onto the .ima keyring (an ima-buf entry) is
// appraised against the policy's keyrings and, when allowed, verifies
// later signatures, as in Keylime; ignored keyrings are neither appraised
// nor used; a keyring the policy does not list is a violation.
func TestKeyringLearning(t *testing.T) {
	ms := realMeasurements(t)
	der := certDER(t)
	sum := sha256.Sum256(der)
	load := keyEntry(t, ".ima", der)
	sigOnly := func(edit func(p map[string]any)) *Runtime {
		return keylimePolicyOf(t, ms, func(p map[string]any) {
			p["digests"] = map[string]any{}
			p["excludes"] = []string{"boot_aggregate", "/usr/sbin/ima-init"}
			edit(p)
		})
	}
	// Allowed: the key is learned and every signature verifies.
	rt := sigOnly(func(p map[string]any) { p["keyrings"] = map[string]any{".ima": []string{hex.EncodeToString(sum[:])}} })
	a := New(rt, nil)
	if v := a.AppraiseMeasurement(1, load); len(v) != 0 {
		t.Fatalf("allowed key: %+v", v)
	}
	var signed []*record.Measurement
	for _, m := range ms {
		f, _ := ima.DecodeTemplate(m.Template, m.TemplateData)
		if len(f.Sig) > 0 {
			signed = append(signed, m)
		}
	}
	if v := appraiseAll(a, signed); len(v) != 0 {
		t.Fatalf("signed entries with the learned key: %d violations, first %+v", len(v), v[0])
	}
	if s := a.Report().Signatures; s.Verified != realSigned || !strings.Contains(strings.Join(s.Keys, ","), "80277e5c") {
		t.Fatalf("signatures %+v", s.Keys)
	}
	// Not in keyrings: a violation, and the key is not used.
	rt = sigOnly(func(p map[string]any) {})
	a = New(rt, nil)
	if v := a.AppraiseMeasurement(1, load); len(v) != 1 || !strings.Contains(v[0].Reason, "keyring not in the policy") {
		t.Fatalf("unlisted keyring: %+v", v)
	}
	if v := a.AppraiseMeasurement(2, signed[0]); len(v) != 1 {
		t.Fatalf("signature verified with a refused key: %+v", v)
	}
	// Wrong digest for the keyring.
	rt = sigOnly(func(p map[string]any) { p["keyrings"] = map[string]any{".ima": []string{strings.Repeat("ab", 32)}} })
	if v := New(rt, nil).AppraiseMeasurement(1, load); len(v) != 1 || !strings.Contains(v[0].Reason, "not allowed on this keyring") {
		t.Fatalf("wrong key digest: %+v", v)
	}
	// Ignored keyrings: no violation, key not used.
	for _, ign := range []string{"*", ".ima"} {
		rt = sigOnly(func(p map[string]any) {
			p["ima"] = map[string]any{"ignored_keyrings": []string{ign}, "log_hash_alg": "sha1", "dm_policy": nil}
		})
		a = New(rt, nil)
		if v := a.AppraiseMeasurement(1, load); len(v) != 0 {
			t.Fatalf("ignored keyring %q: %+v", ign, v)
		}
		if len(a.Report().Ignored) != 1 {
			t.Fatalf("ignored keyring %q not reported", ign)
		}
		if v := a.AppraiseMeasurement(2, signed[0]); len(v) != 1 {
			t.Fatalf("key of ignored keyring %q used", ign)
		}
	}
}

// The policy's own verification-keys (Keylime's tenant keyring, a JSON
// string) verify signatures like --ima-keys.
func TestVerificationKeys(t *testing.T) {
	ms := realMeasurements(t)
	b, _ := os.ReadFile(signingCert)
	blk, _ := pem.Decode(b)
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(c.PublicKey)
	kr, _ := json.Marshal(map[string]any{"meta": map[string]any{"version": 1}, "keyids": []int64{0x80277e5c},
		"pubkeys": []string{base64.StdEncoding.EncodeToString(spki)}})
	rt := keylimePolicyOf(t, ms, func(p map[string]any) {
		p["digests"] = map[string]any{}
		p["verification-keys"] = string(kr)
	})
	a := New(rt, nil)
	appraiseAll(a, ms)
	if s := a.Report().Signatures; s.Verified != realSigned {
		t.Fatalf("verified %d with verification-keys", s.Verified)
	}
	// Without key ids Keylime derives them from the keys (SHA-1 of the
	// PKCS #1 DER, last 4 bytes); this certificate's SKID is RFC 5280's
	// method 1, the same SHA-1, so the derived id matches the signatures'.
	if id, err := KeyIDv2(c.PublicKey); err != nil || id != 0x80277e5c {
		t.Fatalf("derived key id %08x, %v", id, err)
	}
	kr, _ = json.Marshal(map[string]any{"keyids": []int64{}, "pubkeys": []string{base64.StdEncoding.EncodeToString(spki)}})
	rt = keylimePolicyOf(t, ms, func(p map[string]any) { p["verification-keys"] = string(kr) })
	a = New(rt, nil)
	appraiseAll(a, ms)
	if s := a.Report().Signatures; s.Verified != realSigned {
		t.Fatalf("derived key id: verified %d", s.Verified)
	}
	// A wrong key id: no key, nothing verifies.
	kr, _ = json.Marshal(map[string]any{"keyids": []int64{1}, "pubkeys": []string{base64.StdEncoding.EncodeToString(spki)}})
	rt = keylimePolicyOf(t, ms, func(p map[string]any) { p["verification-keys"] = string(kr) })
	a = New(rt, nil)
	appraiseAll(a, ms)
	if s := a.Report().Signatures; s.Verified != 0 || s.Entries[0].Status != StatusNoKey {
		t.Fatalf("wrong key id: verified %d", s.Verified)
	}
}

func ngEntry(path string, digest []byte, tmplHash []byte, pcr uint32) *record.Measurement {
	e := ima.NewIMANG(10, "sha256", digest, path)
	th := e.TemplateHash
	if tmplHash != nil {
		th = tmplHash
	}
	return &record.Measurement{PCR: pcr, TemplateHashAlg: "sha1", TemplateHash: th, Template: e.TemplateName, TemplateData: e.TemplateData}
}

// Keylime's rules beyond digests: excludes anchor at the start, ToMToU
// entries are skipped (or rejected on request), other PCRs and other
// template hash algorithms violate, generic ima-buf entries need the
// ima-buf list, boot_aggregate is appraised only when listed.
func TestKeylimeRules(t *testing.T) {
	d := func(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }
	hx := func(s string) string { return hex.EncodeToString(d(s)) }
	doc := func(extra string) *Runtime {
		p, err := Parse([]byte(`{
		  "meta": {"version": 1, "generator": 1}, "release": 0,
		  "digests": {"/usr/bin/ok": ["` + hx("ok") + `"], "/opt/tmp/tool": ["` + hx("tool") + `"]},
		  "excludes": ["tmp/", "/var/log/.*"],
		  "keyrings": {}, "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
		  "ima-buf": {"kexec-cmdline": ["` + hx("console=ttyS0") + `"]},
		  "verification-keys": ""` + extra + `}`))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	rt := doc("")
	zero := make([]byte, 20)
	buf := func(name, content string) *record.Measurement {
		var data []byte
		field := func(b []byte) {
			data = append(data, byte(len(b)), byte(len(b)>>8), 0, 0)
			data = append(data, b...)
		}
		field(append([]byte("sha256:\x00"), d(content)...))
		field(append([]byte(name), 0))
		field([]byte(content))
		h := sha1.Sum(data)
		return &record.Measurement{PCR: 10, TemplateHashAlg: "sha1", TemplateHash: h[:], Template: "ima-buf", TemplateData: data}
	}
	for _, tt := range []struct {
		name   string
		m      *record.Measurement
		reason string
	}{
		{"allowed", ngEntry("/usr/bin/ok", d("ok"), nil, 10), ""},
		{"exclude anchors at the start: tmp/ does not exclude /opt/tmp/x", ngEntry("/opt/tmp/x", d("x"), nil, 10), "path not in policy"},
		{"/var/log/.* excludes", ngEntry("/var/log/syslog", d("x"), nil, 10), ""},
		{"tmp/ excludes tmp/x", ngEntry("tmp/x", d("x"), nil, 10), ""},
		{"ToMToU entry skipped", ngEntry("/usr/bin/changing", make([]byte, 32), zero, 10), ""},
		{"other PCR", ngEntry("/usr/bin/ok", d("ok"), nil, 11), "PCR 11"},
		{"template hash algorithm", func() *record.Measurement {
			m := ngEntry("/usr/bin/ok", d("ok"), nil, 10)
			h := sha256.Sum256(m.TemplateData)
			m.TemplateHashAlg, m.TemplateHash = "sha256", h[:]
			return m
		}(), "ima.log_hash_alg is sha1"},
		{"kexec-cmdline allowed", buf("kexec-cmdline", "console=ttyS0"), ""},
		{"kexec-cmdline not allowed", buf("kexec-cmdline", "init=/bin/sh"), "buffer digest not allowed"},
		{"unlisted ima-buf name", buf("some-buffer", "x"), "not in the policy's ima-buf"},
		{"boot_aggregate not listed: skipped", ngEntry("boot_aggregate", make([]byte, 32), nil, 10), ""},
		// A program a guest user named boot_aggregate (IMA records a bare
		// name when the path is too long): not the first entry of a boot.
		{"boot_aggregate later in the log", func() *record.Measurement {
			m := ngEntry("boot_aggregate", d("a user's binary"), nil, 10)
			m.LogIndex = 57
			return m
		}(), "path not in policy"},
		{"boot_aggregate in an ima-buf entry", buf("boot_aggregate", "x"), "not in the policy's ima-buf"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			v := New(rt, nil).AppraiseMeasurement(1, tt.m)
			if tt.reason == "" && len(v) != 0 || tt.reason != "" && (len(v) != 1 || !strings.Contains(v[0].Reason, tt.reason)) {
				t.Fatalf("violations %+v, want %q", v, tt.reason)
			}
		})
	}
	a := New(rt, nil)
	a.AppraiseMeasurement(1, ngEntry("/usr/bin/changing", make([]byte, 32), zero, 10))
	a.AppraiseMeasurement(2, ngEntry("boot_aggregate", make([]byte, 32), nil, 10))
	if ig := a.Report().Ignored; len(ig) != 2 || !strings.Contains(ig[0].Reason, "time-of-measure") || !strings.Contains(ig[1].Reason, "boot_aggregate") {
		t.Fatalf("ignored %+v", ig)
	}
	// tomtou: reject; a listed boot_aggregate is appraised.
	rt = doc(`, "tpmmux": {"tomtou": "reject"}`)
	if v := New(rt, nil).AppraiseMeasurement(1, ngEntry("/usr/bin/changing", make([]byte, 32), zero, 10)); len(v) != 1 {
		t.Fatalf("tomtou reject: %+v", v)
	}
	rt, err := Parse([]byte(`{"digests": {"boot_aggregate": ["` + strings.Repeat("0", 64) + `"]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if v := New(rt, nil).AppraiseMeasurement(1, ngEntry("boot_aggregate", make([]byte, 32), nil, 10)); len(v) != 0 {
		t.Fatalf("listed zero boot_aggregate: %+v", v)
	}
	if v := New(rt, nil).AppraiseMeasurement(1, ngEntry("boot_aggregate", d("pcrs"), nil, 10)); len(v) != 1 {
		t.Fatalf("wrong boot_aggregate accepted")
	}
}

// What Keylime's schema allows loads (unknown top-level keys too, and old
// "alg:hex" digests, which never match); what it forbids does not.
func TestParseKeylimeSchema(t *testing.T) {
	for _, doc := range []string{
		`{"digests": {}, "future-key": {"x": 1}}`,
		`{"digests": {"boot_aggregate": ["sha256:4309217e9709def327c3409407f4d52907aeba46ef1b4f46529fd095f2ef9fb2"]}}`,
		`{"digests": {}, "ima": {"ignored_keyrings": ["*"], "log_hash_alg": "sha512", "dm_policy": null}}`,
		`{"digests": {}, "verification-keys": ""}`,
		`{"digests": {}, "tpmmux": {"launch": {"files": {"kernel": "` + strings.Repeat("ab", 32) + `"}}}}`,
	} {
		if _, err := Parse([]byte(doc)); err != nil {
			t.Errorf("%s: %v", doc, err)
		}
	}
	for _, doc := range []string{
		`{"digests": {}, "ima": {"log_hash_alg": "md5"}}`,
		`{"digests": {}, "ima": {"dm_policy": {"version": 1}}}`,
		`{"digests": {}, "excludes": ["(?=lookahead)"]}`,
		`{"digests": {}, "verification-keys": "{\"pubkeys\": [\"!!\"]}"}`,
		`{"digests": {}, "tpmmux": {"unknown": 1}}`,
		`{"digests": {}, "tpmmux": {"launch": {"files": {"bios": ["00"]}}}}`,
		`{"digests": {}, "tpmmux": {"tomtou": "maybe"}}`,
		`{"payload": "e30=", "payloadType": "application/vnd.keylime+json", "signatures": [], "digests": {}}`,
		`{"digests": {}} {"digests": {}}`,
	} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("accepted %s", doc)
		}
	}
}

// The launch policy pins the genesis record's launch measurement.
func TestLaunchPolicy(t *testing.T) {
	k := sha256.Sum256([]byte("vmlinuz"))
	i := sha256.Sum256([]byte("initrd.img"))
	x := sha256.Sum256([]byte("<domain/>"))
	g := &record.Genesis{Name: "vm-a", DomainXML: x, Files: []record.File{
		{Role: "kernel", Path: "/boot/vmlinuz", SHA256: k[:]},
		{Role: "initrd", Path: "/boot/initrd.img", SHA256: i[:]},
		{Role: "loader", Path: "/usr/share/OVMF/OVMF_CODE.fd", Error: "permission denied"},
	}}
	h := func(b [32]byte) string { return hex.EncodeToString(b[:]) }
	other := strings.Repeat("cd", 32)
	for _, tt := range []struct {
		name   string
		doc    string
		reason []string
	}{
		{"all allowed", `{"domain_xml_sha256": "` + h(x) + `", "files": {"kernel": ["` + other + `", "` + h(k) + `"], "initrd": ["` + h(i) + `"]}}`, nil},
		{"kernel changed", `{"files": {"kernel": ["` + other + `"]}}`, []string{"kernel digest not allowed"}},
		{"domain XML changed", `{"domain_xml_sha256": ["` + other + `"]}`, []string{"domain XML digest not allowed"}},
		{"unmeasured loader", `{"files": {"loader": ["` + other + `"]}}`, []string{"was not measured: permission denied"}},
		{"missing nvram", `{"files": {"nvram": ["` + other + `"]}}`, []string{"pins a nvram but the launch has none"}},
		{"two", `{"domain_xml_sha256": ["` + other + `"], "files": {"initrd": ["` + other + `"]}}`, []string{"domain XML", "initrd digest"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ext, err := ParseLaunch([]byte(tt.doc))
			if err != nil {
				t.Fatal(err)
			}
			a := New(nil, nil).WithLaunch(ext.Launch)
			v := a.AppraiseGenesis(g)
			if len(v) != len(tt.reason) {
				t.Fatalf("violations %+v, want %q", v, tt.reason)
			}
			for n, r := range tt.reason {
				if !strings.Contains(v[n].Reason, r) {
					t.Fatalf("violation %d %+v, want %q", n, v[n], r)
				}
			}
			if l := a.Report().Launch; l == nil || l.OK != (len(tt.reason) == 0) || len(l.Checked) == 0 {
				t.Fatalf("launch report %+v", l)
			}
			// Launch only: measurements are not appraised.
			if v := a.AppraiseMeasurement(1, ngEntry("/x", k[:], nil, 10)); v != nil {
				t.Fatal("launch-only appraisal appraised a measurement")
			}
		})
	}
	// The same section inside a runtime policy, and the file forms
	// ParseLaunch takes.
	for _, doc := range []string{
		`{"digests": {}, "tpmmux": {"launch": {"files": {"kernel": ["` + h(k) + `"]}}}}`,
		`{"launch": {"files": {"kernel": ["` + h(k) + `"]}}}`,
	} {
		ext, err := ParseLaunch([]byte(doc))
		if err != nil || ext.Launch == nil || len(ext.Launch.Files["kernel"]) != 1 {
			t.Fatalf("%s: %v", doc, err)
		}
	}
	if _, err := ParseLaunch([]byte(`{}`)); err == nil {
		t.Fatal("empty launch policy accepted")
	}
	rt, err := Parse([]byte(`{"digests": {}, "tpmmux": {"launch": {"files": {"kernel": ["` + other + `"]}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if v := New(rt, nil).AppraiseGenesis(g); len(v) != 1 {
		t.Fatalf("runtime policy's launch section: %+v", v)
	}
}

// FuzzAppraise feeds arbitrary template data, signatures and key buffers
// to the appraisal (with keys, keyrings and excludes): no panic.
func FuzzAppraise(f *testing.F) {
	ms := realMeasurementsF(f)
	for _, m := range ms[:8] {
		f.Add(m.Template, m.TemplateData, m.TemplateHash)
	}
	f.Add("ima-buf", []byte{}, []byte{1})
	rt, err := Parse([]byte(`{"digests": {"/usr/bin/bash": ["` + strings.Repeat("ab", 32) + `"]}, "excludes": ["/tmp/"],
		"keyrings": {".ima": ["` + strings.Repeat("cd", 32) + `"]}, "ima-buf": {"kexec-cmdline": ["` + strings.Repeat("ef", 32) + `"]},
		"ima": {"ignored_keyrings": [".builtin_trusted_keys"], "log_hash_alg": "sha1", "dm_policy": null},
		"tpmmux": {"launch": {"files": {"kernel": ["` + strings.Repeat("01", 32) + `"]}}}}`))
	if err != nil {
		f.Fatal(err)
	}
	keys, err := ReadKeyFile(signingCert)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, template string, data, th []byte) {
		a := New(rt, keys)
		m := &record.Measurement{PCR: 10, TemplateHashAlg: "sha1", TemplateHash: th, Template: template, TemplateData: data}
		a.AppraiseMeasurement(1, m)
		keyFromBuffer(data)
		verifySignature(data, th, "sha256", a.lookup)
		a.Report()
	})
}

func realMeasurementsF(f *testing.F) []*record.Measurement {
	b, err := os.ReadFile(realList)
	if err != nil {
		f.Fatal(err)
	}
	es, err := ima.ParseList(b)
	if err != nil {
		f.Fatal(err)
	}
	var out []*record.Measurement
	for _, e := range es {
		out = append(out, &record.Measurement{PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, TemplateData: e.TemplateData})
	}
	return out
}
