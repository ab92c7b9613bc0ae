package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// The fixture: a bridge run on the simulator (with an EK certificate from a
// test CA, so its AK can be enrolled) with one VM that streamed the real
// IMA list of a Debian guest (454 ima-sig entries, 188 signed) and bound
// its TLS key; evidence for it as the tenant gets it.
type fixture struct {
	dir      string
	tp       tpm.TPM
	m        *mux.Mux
	ca       *enrolltest.CA
	nonce    string
	tlsKey   string // PEM of the bound key
	otherKey string // PEM of a key bound nowhere
	kernel   [32]byte
	xml      [32]byte
	ms       []*record.Measurement
}

var (
	fixOnce sync.Once
	fix     *fixture
	fixErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fix != nil {
		fix.m.Close()
		fix.tp.Close()
		os.RemoveAll(fix.dir)
	}
	os.Exit(code)
}

func getFixture(t *testing.T) *fixture {
	t.Helper()
	fixOnce.Do(func() { fix, fixErr = buildFixture() })
	if fixErr != nil {
		t.Fatal(fixErr)
	}
	return fix
}

func pemKey(k *ecdsa.PrivateKey) string {
	der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

func buildFixture() (*fixture, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "tpmmux-verify-cli-")
	if err != nil {
		return nil, err
	}
	f := &fixture{dir: dir, nonce: "00112233445566778899aabbccddeeff"}
	if f.tp, err = tpm.Open(ctx, "sim"); err != nil {
		return nil, err
	}
	if f.ca, err = enrolltest.NewCA("tenant test EK CA"); err != nil {
		return nil, err
	}
	if _, err := enrolltest.Provision(ctx, f.tp, f.ca); err != nil {
		return nil, err
	}
	st, err := logstore.Open(filepath.Join(dir, "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		return nil, err
	}
	if f.m, err = mux.Open(ctx, f.tp, st, mux.Config{Host: "cli-host", Version: "test"}); err != nil {
		return nil, err
	}
	f.kernel = sha256.Sum256([]byte("vmlinuz-6.1"))
	f.xml = sha256.Sum256([]byte("<domain/>"))
	ident, err := f.m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x42}, Name: "vm-t", CID: 7, DomainXML: f.xml,
		Files: []record.File{{Role: "kernel", Path: "/var/lib/libvirt/boot/vmlinuz", SHA256: f.kernel[:]}}})
	if err != nil {
		return nil, err
	}
	list, err := os.ReadFile("../../internal/ima/testdata/guest-imasig-sha256.bin")
	if err != nil {
		return nil, err
	}
	es, err := ima.ParseList(list)
	if err != nil {
		return nil, err
	}
	var recs []*record.Record
	for i, e := range es {
		m := &record.Measurement{PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
			TemplateData: e.TemplateData, LogIndex: uint64(i), BootID: "boot-1"}
		f.ms = append(f.ms, m)
		recs = append(recs, &record.Record{Kind: record.KindMeasurement, Time: int64(i), Measurement: m})
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	f.tlsKey, f.otherKey = pemKey(key), pemKey(other)
	kh, _ := verify.KeyHash(&key.PublicKey)
	recs = append(recs, &record.Record{Kind: record.KindBinding, Time: 1, Binding: &record.Binding{Purpose: "tls", KeyHash: kh}})
	tk, err := f.m.Submit(ident.ID(), recs...)
	if err != nil {
		return nil, err
	}
	if _, err := tk.Wait(ctx); err != nil {
		return nil, err
	}
	nonce, _ := hex.DecodeString(f.nonce)
	ev, err := f.m.Evidence(ctx, ident.ID(), nonce)
	if err != nil {
		return nil, err
	}
	evJSON, err := json.Marshal(ev)
	if err != nil {
		return nil, err
	}
	identJSON, err := json.Marshal(ident)
	if err != nil {
		return nil, err
	}
	akPEM, err := tpm.AKPEM(f.tp.AK())
	if err != nil {
		return nil, err
	}
	for name, b := range map[string][]byte{"evidence.json": evJSON, "identity.json": identJSON, "ak.pem": akPEM,
		"tls.pem": []byte(f.tlsKey), "other.pem": []byte(f.otherKey), "ca.pem": f.ca.PEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return nil, err
		}
	}
	return f, nil
}

func (f *fixture) path(name string) string { return filepath.Join(f.dir, name) }

// policyFor writes a runtime policy (as Keylime's tool writes it) for the
// fixture's list, edited.
func (f *fixture) policyFor(t *testing.T, edit func(p map[string]any)) string {
	t.Helper()
	digests := map[string][]string{}
	for _, m := range f.ms {
		fl, _ := ima.DecodeTemplate(m.Template, m.TemplateData)
		digests[fl.Path] = append(digests[fl.Path], hex.EncodeToString(fl.Digest))
	}
	p := map[string]any{
		"meta": map[string]any{"version": 1, "generator": 3}, "release": 0, "digests": digests, "excludes": []string{},
		"keyrings": map[string]any{}, "ima": map[string]any{"ignored_keyrings": []string{}, "log_hash_alg": "sha1", "dm_policy": nil},
		"ima-buf": map[string]any{}, "verification-keys": "",
	}
	if edit != nil {
		edit(p)
	}
	b, _ := json.Marshal(p)
	path := filepath.Join(t.TempDir(), "policy.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func (f *fixture) args(trust ...string) []string {
	a := []string{"--evidence", f.path("evidence.json"), "--nonce", f.nonce, "--identity", f.path("identity.json")}
	if len(trust) == 0 {
		trust = []string{"--ak", f.path("ak.pem")}
	}
	return append(a, trust...)
}

// runCLI runs the verifier and returns its exit code, stdout and stderr.
func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func report(t *testing.T, stdout string) *verify.Report {
	t.Helper()
	var r verify.Report
	if err := json.Unmarshal([]byte(stdout), &r); err != nil {
		t.Fatalf("report: %v\n%s", err, stdout)
	}
	return &r
}

// A policy that allows the list: trusted, and the report accounts for the
// appraisal and the 188 signatures (verified with --ima-keys).
func TestPolicyTrusted(t *testing.T) {
	f := getFixture(t)
	pol := f.policyFor(t, nil)
	code, out, errs := runCLI(append(f.args(), "--policy", pol, "--ima-keys", "../../internal/policy/testdata/ima-signing-cert.pem", "--json")...)
	if code != exitTrusted {
		t.Fatalf("exit %d: %s", code, errs)
	}
	r := report(t, out)
	if !r.Trusted || r.Appraisal == nil || r.Appraisal.Appraised != 454 || r.Appraisal.Signatures.Verified != 188 || r.Trust.AK != "pinned" {
		t.Fatalf("report: trusted %v appraisal %+v trust %+v", r.Trusted, r.Appraisal, r.Trust)
	}
	if r.Genesis == nil || r.Genesis.DomainXML != hex.EncodeToString(f.xml[:]) || len(r.Genesis.Files) != 1 ||
		r.Genesis.Files[0].SHA256 != hex.EncodeToString(f.kernel[:]) || r.Genesis.Files[0].Role != "kernel" {
		t.Fatalf("genesis %+v", r.Genesis)
	}
	// The text form.
	code, out, _ = runCLI(append(f.args(), "--policy", pol, "--ima-keys", "../../internal/policy/testdata/ima-signing-cert.pem")...)
	if code != exitTrusted || !strings.Contains(out, "signatures: 188 of 188 verified") || !strings.Contains(out, "AK pinned") {
		t.Fatalf("exit %d: %s", code, out)
	}
}

// Entries the policy does not allow: exit 1, the first stderr line says
// why, and the JSON report lists every violating entry with its path,
// digest and reason.
func TestPolicyViolations(t *testing.T) {
	f := getFixture(t)
	var bashDigest string
	pol := f.policyFor(t, func(p map[string]any) {
		d := p["digests"].(map[string][]string)
		bashDigest = d["/usr/bin/bash"][0]
		d["/usr/bin/bash"] = []string{strings.Repeat("ab", 32)} // a different bash
		delete(d, "/usr/bin/ls")                                // ls not allowed at all
	})
	code, out, errs := runCLI(append(f.args(), "--policy", pol, "--json")...)
	if code != exitRejected {
		t.Fatalf("exit %d", code)
	}
	first := strings.SplitN(errs, "\n", 2)[0]
	if !strings.HasPrefix(first, "rejected: policy: 2 violation(s)") {
		t.Fatalf("first stderr line %q", first)
	}
	r := report(t, out)
	if r.Trusted || len(r.Violations) != 2 {
		t.Fatalf("violations %+v", r.Violations)
	}
	got := map[string]verify.Violation{}
	for _, v := range r.Violations {
		got[v.Path] = v
	}
	if v := got["/usr/bin/bash"]; v.Digest != "sha256:"+bashDigest || v.Reason != "digest not allowed for this path" || v.Seq == 0 {
		t.Fatalf("bash violation %+v", v)
	}
	if v := got["/usr/bin/ls"]; v.Reason != "path not in policy" || !strings.HasPrefix(v.Digest, "sha256:") {
		t.Fatalf("ls violation %+v", v)
	}
	// Without --json the violations are on stderr after the first line.
	code, _, errs = runCLI(append(f.args(), "--policy", pol)...)
	if code != exitRejected || !strings.Contains(errs, "violation: record") || !strings.Contains(errs, "/usr/bin/ls") {
		t.Fatalf("exit %d: %s", code, errs)
	}
}

// The tpmmux launch section (in the policy, or --launch-policy) pins the
// launch measurement of the genesis record.
func TestLaunchPolicy(t *testing.T) {
	f := getFixture(t)
	ok := fmt.Sprintf(`{"launch": {"domain_xml_sha256": "%x", "files": {"kernel": ["%x"]}}}`, f.xml, f.kernel)
	bad := fmt.Sprintf(`{"launch": {"files": {"kernel": ["%s"]}}}`, strings.Repeat("ef", 32))
	for _, tt := range []struct {
		name string
		doc  string
		code int
	}{{"pinned", ok, exitTrusted}, {"kernel changed", bad, exitRejected}} {
		t.Run(tt.name, func(t *testing.T) {
			lp := filepath.Join(t.TempDir(), "launch.json")
			os.WriteFile(lp, []byte(tt.doc), 0o644)
			code, out, errs := runCLI(append(f.args(), "--launch-policy", lp, "--json")...)
			if code != tt.code {
				t.Fatalf("exit %d: %s", code, errs)
			}
			r := report(t, out)
			if r.Appraisal == nil || r.Appraisal.Launch == nil || r.Appraisal.Launch.OK != (tt.code == 0) {
				t.Fatalf("launch report %+v", r.Appraisal)
			}
			if tt.code != 0 && (len(r.Violations) != 1 || !strings.Contains(r.Violations[0].Reason, "kernel digest not allowed") || !strings.Contains(errs, "launch:kernel")) {
				t.Fatalf("violations %+v, stderr %s", r.Violations, errs)
			}
			// The same section inside the runtime policy.
			var sec map[string]any
			json.Unmarshal([]byte(tt.doc), &sec)
			pol := f.policyFor(t, func(p map[string]any) { p["tpmmux"] = sec })
			if code, _, errs := runCLI(append(f.args(), "--policy", pol)...); code != tt.code {
				t.Fatalf("in the runtime policy: exit %d: %s", code, errs)
			}
		})
	}
}

// --bind-key: the VM's bound TLS key passes; a key bound nowhere is
// rejected with the contract's reason.
func TestBindKey(t *testing.T) {
	f := getFixture(t)
	code, out, errs := runCLI(append(f.args(), "--bind-key", f.path("tls.pem"), "--json")...)
	if code != exitTrusted {
		t.Fatalf("bound key: exit %d: %s", code, errs)
	}
	if r := report(t, out); len(r.BoundKeys) != 1 || !r.BoundKeys[0].Bound || r.BoundKeys[0].Purpose != "tls" {
		t.Fatalf("bound keys %+v", r.BoundKeys)
	}
	code, _, errs = runCLI(append(f.args(), "--bind-key", f.path("other.pem"))...)
	h, _ := verify.KeyHashPEM([]byte(f.otherKey))
	want := fmt.Sprintf("rejected: key %x is not bound in vm vm-t's log", h)
	if code != exitRejected || !strings.HasPrefix(errs, want) {
		t.Fatalf("exit %d, stderr %q, want prefix %q", code, errs, want)
	}
}

// Enrollment by credential activation, the verifier's steps run through
// the CLI (the host's steps through the TPM, as the bridge does), then
// verification with --ek-ca and --enrolled instead of a pinned AK.
func TestEnrollAndVerify(t *testing.T) {
	f := getFixture(t)
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	en := f.tp.(tpm.Enroller)
	e, err := en.Enrollment(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	req := &enroll.Request{Version: enroll.Version, Host: "cli-host", EKKind: string(e.Kind),
		EKCert:   string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})),
		EKPublic: e.EKPublic, AKPublic: e.AKPublic}
	if err := enroll.WriteJSON(p("req.json"), req, 0o644); err != nil {
		t.Fatal(err)
	}
	// Another vendor's CA refuses the request.
	other, _ := enrolltest.NewCA("other vendor")
	os.WriteFile(p("other.pem"), other.PEM, 0o644)
	code, _, errs := runCLI("enroll", "challenge", "--request", p("req.json"), "--ek-ca", p("other.pem"), "--out", p("chal.json"), "--state", p("state.json"))
	if code != exitRejected || !strings.Contains(errs, "does not chain to a trusted EK CA") {
		t.Fatalf("other CA: exit %d: %s", code, errs)
	}
	code, out, errs := runCLI("enroll", "challenge", "--request", p("req.json"), "--ek-ca", f.path("ca.pem"), "--out", p("chal.json"), "--state", p("state.json"))
	if code != exitTrusted {
		t.Fatalf("challenge: exit %d: %s", code, errs)
	}
	if !strings.Contains(out, "tpmmux-bridge enroll-answer") {
		t.Fatalf("challenge output %s", out)
	}
	if fi, err := os.Stat(p("state.json")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v %v", fi.Mode(), err)
	}
	var chal enroll.Challenge
	if err := enroll.ReadJSON(p("chal.json"), &chal); err != nil {
		t.Fatal(err)
	}
	secret, err := en.ActivateCredential(context.Background(), tpm.EKKind(chal.EKKind), chal.CredentialBlob, chal.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	// A wrong answer is refused.
	wrong := &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: make([]byte, 32)}
	enroll.WriteJSON(p("wrong.json"), wrong, 0o644)
	if code, _, errs := runCLI("enroll", "finish", "--answer", p("wrong.json"), "--state", p("state.json"), "--enrolled", p("store")); code != exitRejected || !strings.HasPrefix(errs, "refused: ") {
		t.Fatalf("wrong answer: exit %d: %s", code, errs)
	}
	enroll.WriteJSON(p("ans.json"), &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: secret}, 0o644)
	code, out, errs = runCLI("enroll", "finish", "--answer", p("ans.json"), "--state", p("state.json"), "--enrolled", p("store"), "--out", p("ak.pem"))
	if code != exitTrusted || !strings.Contains(out, "enrolled: the AK of cli-host") {
		t.Fatalf("finish: exit %d: %s %s", code, out, errs)
	}
	if code, out, _ := runCLI("enroll", "list", "--enrolled", p("store"), "--ek-ca", f.path("ca.pem")); code != 0 || !strings.Contains(out, "cli-host") {
		t.Fatalf("list: %d %s", code, out)
	}

	// Verification with the enrolled AK.
	code, out, errs = runCLI(append(f.args("--ek-ca", f.path("ca.pem"), "--enrolled", p("store")), "--json")...)
	if code != exitTrusted {
		t.Fatalf("enrolled AK: exit %d: %s", code, errs)
	}
	r := report(t, out)
	if r.Trust == nil || r.Trust.AK != "enrolled" || r.Trust.EKIssuer == "" || r.Trust.Host != "cli-host" || len(r.Trust.EKCertSHA256) != 64 {
		t.Fatalf("trust %+v", r.Trust)
	}
	// The finish --out PEM pins the same AK.
	if code, _, errs := runCLI(f.args("--ak", p("ak.pem"))...); code != exitTrusted {
		t.Fatalf("--ak from enrollment: %d %s", code, errs)
	}
	// Under another EK CA, the enrolled AK is not trusted.
	code, _, errs = runCLI(f.args("--ek-ca", p("other.pem"), "--enrolled", p("store"))...)
	if code != exitRejected || !strings.Contains(errs, "does not chain") {
		t.Fatalf("other CA at verification: exit %d: %s", code, errs)
	}
	// An empty store: the evidence's AK is not enrolled.
	code, _, errs = runCLI(f.args("--ek-ca", f.path("ca.pem"), "--enrolled", t.TempDir())...)
	if code != exitRejected || !strings.Contains(errs, "is not enrolled") {
		t.Fatalf("empty store: exit %d: %s", code, errs)
	}
}

func TestUsage(t *testing.T) {
	f := getFixture(t)
	for _, args := range [][]string{
		{},
		{"--evidence", f.path("evidence.json")},
		f.args("--ak", f.path("ak.pem"), "--ek-ca", f.path("ca.pem")),
		f.args("--ek-ca", f.path("ca.pem")),
		append(f.args(), "--ima-keys", f.path("ca.pem")),
		append(f.args(), "--bind-key", f.path("evidence.json")),
		append(f.args(), "--launch-policy", f.path("evidence.json")),
		{"enroll"},
		{"enroll", "challenge"},
		{"enroll", "finish", "--answer", "x"},
		{"enroll", "bogus"},
	} {
		if code, _, errs := runCLI(args...); code != exitUsage {
			t.Errorf("%q: exit %d (%s), want 2", args, code, errs)
		}
	}
	_ = conceal.FormatUUID
}
