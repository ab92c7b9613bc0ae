package main

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tpmmux/tpmmux/internal/daemon"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire/wiretest"
)

// runVerify runs the real tpmmux-verify binary.
func runVerify(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(tool(t, "tpmmux-verify"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, stdout.String(), stderr.String()
}

// TestTenantFlow is the tenant's flow of the README on a TPM manufactured
// like a real one (swtpm_setup with swtpm_localca: an RSA EK certificate
// from a local CA): the host's enroll-request, the verifier's challenge,
// the host's enroll-answer, the verifier's finish; then the VM's evidence
// verified with the enrolled AK and a Keylime runtime policy; a violation
// reported back to the bridge, which logs it and calls a webhook, and the
// actions show in the VM's verified history.
func TestTenantFlow(t *testing.T) {
	p, ca := swtpmproc.ManufactureTest(t, "")
	bundle, err := ca.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	w := func(n string) string { return filepath.Join(work, n) }
	if err := os.WriteFile(w("ek-ca.pem"), bundle, 0o644); err != nil {
		t.Fatal(err)
	}
	var hookMu sync.Mutex
	var hooks []map[string]any
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var ev map[string]any
		json.NewDecoder(r.Body).Decode(&ev)
		hookMu.Lock()
		hooks = append(hooks, ev)
		hookMu.Unlock()
	}))
	defer srv.Close()

	h := newHost(t)
	h.cfg.TPM = p.Spec()
	h.cfg.Enforce = []string{daemon.EnforceLog, daemon.EnforceWebhook}
	h.cfg.EnforceWebhook = srv.URL
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	d, err := daemon.Start(t.Context(), h.cfg, daemon.Options{Version: version, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown()

	// 1. Enrollment: four files between host and verifier.
	if code, out, errs := h.cli("enroll-request", "--out", w("req.json")); code != 0 || !strings.Contains(out, "rsa EK") {
		t.Fatalf("enroll-request: %d %s %s", code, out, errs)
	}
	if code, out, errs := runVerify(t, "enroll", "challenge", "--request", w("req.json"), "--ek-ca", w("ek-ca.pem"), "--out", w("chal.json"), "--state", w("state.json")); code != 0 {
		t.Fatalf("enroll challenge: %d %s %s", code, out, errs)
	}
	if code, out, errs := h.cli("enroll-answer", "--challenge", w("chal.json"), "--out", w("ans.json")); code != 0 {
		t.Fatalf("enroll-answer: %d %s %s", code, out, errs)
	}
	if code, out, errs := runVerify(t, "enroll", "finish", "--answer", w("ans.json"), "--state", w("state.json"), "--enrolled", w("enrolled")); code != 0 || !strings.Contains(out, "swtpm-localca") {
		t.Fatalf("enroll finish: %d %s %s", code, out, errs)
	}

	// 2. A VM runs and its guest streams the real IMA list.
	h.mustHook("vm-a", "prepare", "begin", "-")
	h.mustHook("vm-a", "started", "begin", "-")
	es := wiretest.Entries(t, "../../internal/ima/testdata/guest-imasig-sha256.bin")
	a := wiretest.DialUnix(t, h.serial("vm-a"), true)
	a.Hello("boot-1")
	a.Stream(es, 0, len(es))

	// 3. Attest with the enrolled AK and a policy that does not allow one
	// of the files.
	digests := map[string][]string{}
	for _, e := range es {
		f, err := ima.DecodeTemplate(e.Template, e.Data)
		if err != nil {
			t.Fatal(err)
		}
		digests[f.Path] = append(digests[f.Path], hex.EncodeToString(f.Digest))
	}
	digests["/usr/bin/bash"] = []string{strings.Repeat("00", 32)}
	pol, _ := json.Marshal(map[string]any{"meta": map[string]any{"version": 1, "generator": 3}, "release": 0, "digests": digests,
		"excludes": []string{}, "keyrings": map[string]any{}, "ima": map[string]any{"ignored_keyrings": []string{}, "log_hash_alg": "sha1", "dm_policy": nil},
		"ima-buf": map[string]any{}, "verification-keys": ""})
	os.WriteFile(w("policy.json"), pol, 0o644)
	nonce := "5eed00015eed00015eed00015eed0001"
	if code, _, errs := h.cli("evidence", "--vm", "vm-a", "--nonce", nonce, "--out", w("ev1")); code != 0 {
		t.Fatalf("evidence: %s", errs)
	}
	verifyArgs := func(dir, nonce string, extra ...string) []string {
		return append([]string{"--evidence", filepath.Join(dir, "evidence.json"), "--nonce", nonce, "--identity", filepath.Join(dir, "identity.json"),
			"--ek-ca", w("ek-ca.pem"), "--enrolled", w("enrolled")}, extra...)
	}
	code, out, errs := runVerify(t, verifyArgs(w("ev1"), nonce, "--policy", w("policy.json"), "--json")...)
	if code != 1 || !strings.HasPrefix(errs, "rejected: policy: 1 violation(s)") {
		t.Fatalf("policy verdict: %d %s", code, errs)
	}
	os.WriteFile(w("report.json"), []byte(out), 0o644)
	var rep verify.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Trust == nil || rep.Trust.AK != "enrolled" || !strings.Contains(rep.Trust.EKIssuer, "swtpm-localca") || len(rep.Violations) != 1 || rep.Violations[0].Path != "/usr/bin/bash" {
		t.Fatalf("report: trust %+v violations %+v", rep.Trust, rep.Violations)
	}

	// 4. The verifier tells the bridge; the bridge enforces and records.
	code, out, errs = h.cli("violation", "--vm", "vm-a", "--report", w("report.json"))
	if code != 0 || !strings.Contains(out, "log") || !strings.Contains(out, "webhook") {
		t.Fatalf("violation: %d %s %s", code, out, errs)
	}
	hookMu.Lock()
	if len(hooks) != 1 || hooks[0]["vm"] != "vm-a" || !strings.HasPrefix(hooks[0]["reason"].(string), "policy: 1 violation(s)") ||
		!strings.Contains(hooks[0]["detail"].(string), "/usr/bin/bash") {
		t.Fatalf("webhook got %+v", hooks)
	}
	hookMu.Unlock()
	nonce2 := "5eed00025eed00025eed00025eed0002"
	if code, _, errs := h.cli("evidence", "--vm", "vm-a", "--nonce", nonce2, "--out", w("ev2")); code != 0 {
		t.Fatalf("evidence: %s", errs)
	}
	code, out, errs = runVerify(t, verifyArgs(w("ev2"), nonce2, "--json")...)
	if code != 0 {
		t.Fatalf("verify after enforcement: %d %s", code, errs)
	}
	rep = verify.Report{}
	json.Unmarshal([]byte(out), &rep)
	if len(rep.Actions) != 2 || rep.Actions[0].Detail != "log" || rep.Actions[1].Detail != "webhook" || !strings.Contains(rep.Actions[0].Note, "/usr/bin/bash") {
		t.Fatalf("actions in the verified history: %+v", rep.Actions)
	}
}
