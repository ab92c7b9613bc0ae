package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/qemu"
)

// startQEMU runs a diskless QEMU under TCG (idling in its BIOS) whose QMP
// socket is sock, as a VM that QEMU runs without libvirt. Without
// qemu-system-x86_64 the test is skipped (fails under CI=true).
func startQEMU(t *testing.T, sock string) {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("qemu-system-x86_64 not found (CI=true)")
		}
		t.Skip("qemu-system-x86_64 not installed; skipping the real-QEMU pause test")
	}
	cmd := exec.Command(bin, "-machine", "pc,accel=tcg", "-nodefaults", "-display", "none", "-m", "32",
		"-qmp", "unix:"+sock+",server=on,wait=off")
	logf, _ := os.Create(sock + ".log")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		logf.Close()
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(sock + ".log")
			t.Fatalf("qemu exited: %s", b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu's QMP socket did not appear")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// webhook is a loopback receiver of the bridge's webhook POSTs.
type webhook struct {
	srv    *httptest.Server
	mu     sync.Mutex
	events []webhookEvent
	status int
}

func newWebhook(t *testing.T) *webhook {
	w := &webhook{status: http.StatusNoContent}
	w.srv = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var ev webhookEvent
		b, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" || json.Unmarshal(b, &ev) != nil {
			rw.WriteHeader(http.StatusBadRequest)
			return
		}
		w.mu.Lock()
		w.events = append(w.events, ev)
		st := w.status
		w.mu.Unlock()
		rw.WriteHeader(st)
	}))
	t.Cleanup(w.srv.Close)
	return w
}

// reportOf fetches the VM's evidence and verifies it as a tenant would.
func reportOf(t *testing.T, e *env, vm string) *verify.Report {
	t.Helper()
	nonce := []byte("after the violation")
	ev := e.mustCall(&control.Request{Op: control.OpEvidence, VM: vm, Nonce: nonce}).Evidence
	dec, err := evidence.Decode(ev.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(ev.AKPEM))
	ak, _ := x509.ParsePKIXPublicKey(blk.Bytes)
	rep, err := verify.Verify(dec, verify.Options{Nonce: nonce, Identity: &ev.Identity, AK: ak.(*ecdsa.PublicKey), PCR: 13})
	if err != nil {
		t.Fatalf("evidence after the violation rejected: %v", err)
	}
	return rep
}

// A verifier reports a violation; the bridge logs it, POSTs it to a
// loopback webhook and pauses the VM through its real QEMU's QMP socket,
// and records each action in the VM's own log, where the tenant's
// verifier sees them.
func TestViolationEnforced(t *testing.T) {
	e := newEnv(t)
	qmpDir := filepath.Join(e.dir, "qmp")
	os.MkdirAll(qmpDir, 0o755)
	startQEMU(t, filepath.Join(qmpDir, "vm-e.sock"))
	hook := newWebhook(t)
	e.cfg.Enforce = []string{EnforceLog, EnforceWebhook, EnforcePause}
	e.cfg.EnforceWebhook = hook.srv.URL + "/tpmmux?token=secret"
	e.cfg.EnforceWebhookTimeout = Duration(2 * time.Second)
	e.cfg.EnforceQMPDir = qmpDir
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-e", "")})

	resp := e.mustCall(&control.Request{Op: control.OpViolation, VM: "vm-e", Reason: "policy: 1 violation(s)", Detail: "record 7 /usr/bin/nc: path not in policy"})
	enf := resp.Enforcement
	if enf == nil || enf.VM != "vm-e" || len(enf.Actions) != 3 {
		t.Fatalf("enforcement %+v", enf)
	}
	for i, want := range []string{EnforceLog, EnforceWebhook, EnforcePause} {
		a := enf.Actions[i]
		if a.Action != want || !a.OK || a.Seq == nil || *a.Seq != uint64(i+1) {
			t.Fatalf("action %d: %+v", i, a)
		}
	}
	// The webhook got the violation (and its URL's secret is not logged).
	hook.mu.Lock()
	if len(hook.events) != 1 || hook.events[0].VM != "vm-e" || hook.events[0].Reason != "policy: 1 violation(s)" ||
		hook.events[0].Event != "tpmmux.violation" || len(hook.events[0].Instance) != 32 {
		t.Fatalf("webhook events %+v", hook.events)
	}
	hook.mu.Unlock()
	if strings.Contains(enf.Actions[1].Detail, "secret") || e.log.contains("token=secret") {
		t.Fatal("the webhook URL's query leaked")
	}
	// QEMU is paused.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	mon, err := qemu.DialSocket(ctx, filepath.Join(qmpDir, "vm-e.sock"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := qemu.Status(ctx, mon)
	mon.Close()
	if err != nil || st.Running || st.Status != "paused" {
		t.Fatalf("qemu status %+v, %v", st, err)
	}
	// The tenant's verifier sees the actions in the VM's history.
	rep := reportOf(t, e, "vm-e")
	if rep.Counts.Actions != 3 || len(rep.Actions) != 3 {
		t.Fatalf("report actions %+v", rep.Actions)
	}
	for i, want := range []string{"log", "webhook", qemu.ActionPause} {
		if rep.Actions[i].Detail != want || rep.Actions[i].Seq != uint64(i+1) || !strings.Contains(rep.Actions[i].Note, "/usr/bin/nc: path not in policy") {
			t.Fatalf("report action %d: %+v", i, rep.Actions[i])
		}
	}
}

// Failed actions are recorded as failed; an ended or unknown VM, an empty
// reason, and an oversized detail are refused.
func TestViolationFailures(t *testing.T) {
	e := newEnv(t)
	hook := newWebhook(t)
	hook.status = http.StatusInternalServerError
	e.cfg.Enforce = []string{EnforceWebhook, EnforcePause}
	e.cfg.EnforceWebhook = hook.srv.URL
	e.cfg.EnforceQMPDir = filepath.Join(e.dir, "no-qmp")
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-f", "")})
	enf := e.mustCall(&control.Request{Op: control.OpViolation, VM: "vm-f", Reason: "bad"}).Enforcement
	if len(enf.Actions) != 2 || enf.Actions[0].OK || enf.Actions[1].OK || enf.Actions[0].Seq == nil || enf.Actions[1].Seq == nil {
		t.Fatalf("actions %+v", enf.Actions)
	}
	if !strings.Contains(enf.Actions[0].Detail, "500") || !strings.Contains(enf.Actions[1].Detail, "no QMP socket") {
		t.Fatalf("details %+v", enf.Actions)
	}
	rep := reportOf(t, e, "vm-f")
	if len(rep.Actions) != 2 || rep.Actions[0].Detail != "webhook-failed" || rep.Actions[1].Detail != "pause-failed" {
		t.Fatalf("report actions %+v", rep.Actions)
	}
	for _, req := range []*control.Request{
		{Op: control.OpViolation, VM: "nope", Reason: "x"},
		{Op: control.OpViolation, VM: "vm-f"},
		{Op: control.OpViolation, VM: "vm-f", Reason: "x", Detail: strings.Repeat("d", control.MaxDetail+1)},
	} {
		if _, err := e.call(req); err == nil {
			t.Errorf("violation %+v accepted", req)
		}
	}
	e.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-f", Reason: "destroyed"})
	if _, err := e.call(&control.Request{Op: control.OpViolation, VM: "vm-f", Reason: "x"}); err == nil || !strings.Contains(err.Error(), "has ended") {
		t.Fatalf("violation on an ended VM: %v", err)
	}
}

func TestEnforceConfig(t *testing.T) {
	for _, tt := range []struct {
		name string
		edit func(c *Config)
		err  string
	}{
		{"default: log", func(c *Config) {}, ""},
		{"none", func(c *Config) { c.Enforce = []string{} }, ""},
		{"unknown action", func(c *Config) { c.Enforce = []string{"kill"} }, "unknown action"},
		{"twice", func(c *Config) { c.Enforce = []string{"log", "log"} }, "twice"},
		{"webhook without URL", func(c *Config) { c.Enforce = []string{"webhook"} }, "enforce_webhook must be"},
		{"webhook not http", func(c *Config) { c.Enforce = []string{"webhook"}; c.EnforceWebhook = "file:///etc/passwd" }, "enforce_webhook must be"},
		{"webhook timeout", func(c *Config) {
			c.Enforce = []string{"webhook"}
			c.EnforceWebhook = "http://127.0.0.1:1/"
			c.EnforceWebhookTimeout = Duration(time.Hour)
		}, "enforce_webhook_timeout"},
		{"pause without a way to QEMU", func(c *Config) { c.Enforce = []string{"pause"} }, "cannot reach QEMU"},
		{"pause through libvirt", func(c *Config) { c.Enforce = []string{"pause"}; c.Libvirt = "/run/libvirt/libvirt-sock" }, ""},
		{"relative qmp dir", func(c *Config) { c.EnforceQMPDir = "qmp" }, "absolute"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := DefaultConfig()
			tt.edit(&c)
			err := c.Validate()
			if tt.err == "" && err != nil || tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)) {
				t.Fatalf("err = %v, want %q", err, tt.err)
			}
		})
	}
	// The keys load from bridge.json.
	p := filepath.Join(t.TempDir(), "bridge.json")
	os.WriteFile(p, []byte(`{"enforce": ["log", "webhook"], "enforce_webhook": "https://hooks.example/tpmmux", "enforce_webhook_timeout": "3s"}`), 0o644)
	c, err := LoadConfig(p, false)
	if err != nil || c.Validate() != nil || len(c.Enforce) != 2 || c.webhookTimeout() != 3*time.Second {
		t.Fatalf("config %+v: %v", c, err)
	}
}

// The TPM side of AK enrollment through the control socket: the request
// carries the EK certificate the vendor provisioned and the AK's public
// area; the bridge's TPM activates the verifier's credential.
func TestEnrollOps(t *testing.T) {
	e := newEnv(t)
	e.start()
	if _, err := e.call(&control.Request{Op: control.OpEnrollRequest}); err == nil || !strings.Contains(err.Error(), "no EK certificate") {
		t.Fatalf("enroll-request without an EK certificate: %v", err)
	}
	ca, err := enrolltest.NewCA("daemon test EK CA")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := enrolltest.Provision(context.Background(), e.tp, ca); err != nil {
		t.Fatal(err)
	}
	req := e.mustCall(&control.Request{Op: control.OpEnrollRequest}).Enrollment
	if req == nil || req.EKKind != "ecc" || req.EKCertIndex != "0x01c0000a" || req.Host == "" {
		t.Fatalf("request %+v", req)
	}
	roots, _, _ := enroll.ParseCAs(ca.PEM)
	chal, st, err := enroll.NewChallenge(req, roots, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ans := e.mustCall(&control.Request{Op: control.OpEnrollAnswer, Challenge: chal}).Answer
	rec, err := enroll.Finish(st, ans, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(rec.AKPEM))
	ak, _ := x509.ParsePKIXPublicKey(blk.Bytes)
	if !e.tp.AK().Equal(ak) {
		t.Fatal("enrolled AK is not the bridge's")
	}
	// A tampered or expired challenge does not activate.
	bad := *chal
	bad.CredentialBlob = append([]byte(nil), chal.CredentialBlob...)
	bad.CredentialBlob[len(bad.CredentialBlob)-1] ^= 1
	if _, err := e.call(&control.Request{Op: control.OpEnrollAnswer, Challenge: &bad}); err == nil {
		t.Fatal("tampered challenge activated")
	}
	old := *chal
	old.Expires = time.Now().Add(-time.Minute)
	if _, err := e.call(&control.Request{Op: control.OpEnrollAnswer, Challenge: &old}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired challenge: %v", err)
	}
	if _, err := e.call(&control.Request{Op: control.OpEnrollAnswer}); err == nil {
		t.Fatal("enroll-answer without a challenge")
	}
}
