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
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/transport"
)

// TestUsage runs the command in-process on bad command lines: exit 2 and
// a usage line; and on a bridge that is not there: exit 1.
func TestUsage(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown command", []string{"frobnicate"}, exitUsage, "unknown command"},
		{"unknown transport", []string{"run", "--transport", "tcp"}, exitUsage, "want vsock, virtio-serial or unix"},
		{"unix without path", []string{"--transport", "unix"}, exitUsage, "needs --unix"},
		{"stray argument", []string{"run", "extra"}, exitUsage, "unexpected argument"},
		{"attest without out", []string{"attest", "--nonce", "00"}, exitUsage, "--out DIR is required"},
		{"attest bad nonce", []string{"attest", "--nonce", "xyz", "--out", dir}, exitUsage, "not hex"},
		{"attest long nonce", []string{"attest", "--nonce", strings.Repeat("00", 65), "--out", dir}, exitUsage, "want 1 to 64"},
		{"bind bad key", []string{"bind", "--purpose", "tls", "--key-hash", "00"}, exitUsage, "32 bytes"},
		{"bind no key", []string{"bind", "--purpose", "tls"}, exitUsage, "give --key PEM or --key-hash HEX"},
		{"bind both keys", []string{"bind", "--purpose", "tls", "--key", "k.pem", "--key-hash", strings.Repeat("ab", 32)}, exitUsage, "give --key PEM or --key-hash HEX"},
		{"bind key not PEM", []string{"bind", "--purpose", "tls", "--key", "/dev/null"}, exitUsage, "no PEM public key"},
		{"no list", []string{"run", "--transport", "unix", "--unix", filepath.Join(dir, "s"), "--ima", filepath.Join(dir, "none")}, exitFailure, "is securityfs mounted"},
		{"no bridge", []string{"attest", "--transport", "unix", "--unix", filepath.Join(dir, "s"), "--control", "", "--out", dir}, exitFailure, "no such file"},
		{"bind without agent", []string{"bind", "--purpose", "tls", "--key-hash", strings.Repeat("ab", 32), "--control", filepath.Join(dir, "c")}, exitFailure, "start tpmmux-agent run first"},
		{"help", []string{"help"}, exitOK, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errb bytes.Buffer
			code := run(context.Background(), tt.args, &out, &errb)
			if code != tt.code || !strings.Contains(errb.String(), tt.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d and %q", code, errb.String(), tt.code, tt.want)
			}
		})
	}
}

// build compiles a command into dir; the agent as a static binary.
func build(t *testing.T, dir, pkg string, static bool) string {
	t.Helper()
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Env = os.Environ()
	if static {
		cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
	}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	return out
}

// bridgeRig is a real bridge (simulator TPM) serving one VM on a unix
// socket.
type bridgeRig struct {
	b     *bridge.Bridge
	ident *conceal.Identity
	sock  string
}

func newBridgeRig(t *testing.T) *bridgeRig {
	t.Helper()
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{})
	b := &bridge.Bridge{Mux: m}
	ident, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0xc1, 0x1}, Name: "cli-vm"})
	if err != nil {
		t.Fatal(err)
	}
	r := &bridgeRig{b: b, ident: ident, sock: filepath.Join(t.TempDir(), "bridge.sock")}
	l, err := transport.ListenUnix(r.sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); b.Serve(ctx, ident.ID(), c, false) }()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return r
}

// verifyReport is the part of tpmmux-verify's JSON report the test reads.
type verifyReport struct {
	Trusted bool `json:"trusted"`
	Counts  struct {
		Measurements int `json:"measurements"`
		Bindings     int `json:"bindings"`
	} `json:"counts"`
}

// runVerify runs tpmmux-verify on an attest output directory the way the
// docs say, and returns its exit code and report.
func runVerify(t *testing.T, verifyBin, dir, evidenceFile string, nonceOverride string) (int, verifyReport, string) {
	t.Helper()
	nonce, err := os.ReadFile(filepath.Join(dir, "nonce.hex"))
	if err != nil {
		t.Fatal(err)
	}
	n := strings.TrimSpace(string(nonce))
	if nonceOverride != "" {
		n = nonceOverride
	}
	cmd := exec.Command(verifyBin, "--evidence", filepath.Join(dir, evidenceFile), "--nonce", n,
		"--identity", filepath.Join(dir, "identity.json"), "--ak", filepath.Join(dir, "ak.pem"), "--json")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	var rep verifyReport
	if out.Len() > 0 {
		if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
			t.Fatalf("verify report: %v\n%s", err, out.String())
		}
	}
	return code, rep, errb.String()
}

func runCmd(t *testing.T, bin string, args ...string) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", filepath.Base(bin), strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String(), errb.String()
}

// syncBuffer is a bytes.Buffer safe for a subprocess writer and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestAttestCLIEndToEnd builds the static agent and the verifier, and runs
// them as a tenant would against a real bridge: attest straight from the
// bridge, then a running agent streams the real IMA list, attest through
// its control socket, bind a key; tpmmux-verify checks every output.
func TestAttestCLIEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries")
	}
	bin := t.TempDir()
	agentBin := build(t, bin, "github.com/tpmmux/tpmmux/cmd/tpmmux-agent", true)
	verifyBin := build(t, bin, "github.com/tpmmux/tpmmux/cmd/tpmmux-verify", false)
	r := newBridgeRig(t)
	work := t.TempDir()

	// 1. No agent running: attest asks the bridge directly.
	out1 := filepath.Join(work, "direct")
	stdout, _ := runCmd(t, agentBin, "attest", "--transport", "unix", "--unix", r.sock, "--control", filepath.Join(work, "none.sock"),
		"--nonce", "00112233445566778899aabbccddeeff", "--out", out1)
	t.Logf("attest: %s", strings.TrimSpace(stdout))
	if !strings.Contains(stdout, "via unix") {
		t.Fatalf("attest output %q", stdout)
	}
	for _, f := range []string{"evidence.cbor", "evidence.json", "identity.json", "ak.pem", "nonce.hex"} {
		if _, err := os.Stat(filepath.Join(out1, f)); err != nil {
			t.Fatal(err)
		}
	}
	if fi, _ := os.Stat(filepath.Join(out1, "identity.json")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity.json mode %v, want 0600 (it holds the VM key)", fi.Mode().Perm())
	}
	if code, rep, errs := runVerify(t, verifyBin, out1, "evidence.json", ""); code != 0 || !rep.Trusted || rep.Counts.Measurements != 0 {
		t.Fatalf("verify: exit %d %+v %s", code, rep, errs)
	}
	// A wrong nonce is rejected (exit 1).
	if code, _, errs := runVerify(t, verifyBin, out1, "evidence.json", "ffffffffffffffffffffffffffffffff"); code != 1 {
		t.Fatalf("verify with another nonce: exit %d %s", code, errs)
	}

	// 2. A running agent streams the real list.
	list, err := os.ReadFile("../../internal/ima/testdata/guest-imasig-sha256.bin")
	if err != nil {
		t.Fatal(err)
	}
	imaPath := filepath.Join(work, "binary_runtime_measurements")
	bootPath := filepath.Join(work, "boot_id")
	control := filepath.Join(work, "run", "tpmmux-agent.sock")
	os.MkdirAll(filepath.Dir(control), 0o755)
	os.WriteFile(imaPath, list, 0o644)
	os.WriteFile(bootPath, []byte("1c0ffee0-aaaa-4bbb-8ccc-000000000001\n"), 0o644)
	agentLog := &syncBuffer{}
	cmd := exec.Command(agentBin, "run", "--transport", "unix", "--unix", r.sock, "--ima", imaPath, "--boot-id", bootPath,
		"--control", control, "--poll", "20ms", "-v")
	cmd.Stdout, cmd.Stderr = io.Discard, agentLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
		}
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		gs, err := r.b.Mux.Guest(r.ident.ID())
		if err != nil {
			t.Fatal(err)
		}
		if gs.Next == 454 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bridge has %d entries after 30s\nagent log:\n%s", gs.Next, agentLog.String())
		}
		time.Sleep(20 * time.Millisecond)
	}

	// 3. Attest through the running agent, and bind a key through it.
	out2 := filepath.Join(work, "control")
	stdout, _ = runCmd(t, agentBin, "attest", "--transport", "unix", "--unix", r.sock, "--control", control, "--out", out2)
	if !strings.Contains(stdout, "via control") {
		t.Fatalf("attest output %q", stdout)
	}
	for _, f := range []string{"evidence.json", "evidence.cbor"} {
		code, rep, errs := runVerify(t, verifyBin, out2, f, "")
		if code != 0 || !rep.Trusted || rep.Counts.Measurements != 454 {
			t.Fatalf("verify %s: exit %d %+v %s", f, code, rep, errs)
		}
	}
	// The delta since a verifier's checkpoint, through the running agent,
	// asked for early (the option travels from the command through the
	// control socket and the agent's session to the bridge): tpmmux-verify
	// --checkpoint accepts it, and it is small.
	cp := filepath.Join(work, "checkpoint.json")
	nonce2, _ := os.ReadFile(filepath.Join(out2, "nonce.hex"))
	if out, err := exec.Command(verifyBin, "--evidence", filepath.Join(out2, "evidence.json"), "--nonce", strings.TrimSpace(string(nonce2)),
		"--identity", filepath.Join(out2, "identity.json"), "--ak", filepath.Join(out2, "ak.pem"), "--save-checkpoint", cp).CombinedOutput(); err != nil {
		t.Fatalf("verify --save-checkpoint: %v\n%s", err, out)
	}
	outInc := filepath.Join(work, "incremental")
	runCmd(t, agentBin, "attest", "--transport", "unix", "--unix", r.sock, "--control", control, "--nonce", "0e0f0e0f0e0f0e0f0e0f0e0f0e0f0e0f", "--checkpoint", cp, "--early", "--out", outInc)
	if out, err := exec.Command(verifyBin, "--evidence", filepath.Join(outInc, "evidence.cbor"), "--nonce", "0e0f0e0f0e0f0e0f0e0f0e0f0e0f0e0f",
		"--identity", filepath.Join(outInc, "identity.json"), "--ak", filepath.Join(outInc, "ak.pem"), "--checkpoint", cp).CombinedOutput(); err != nil {
		t.Fatalf("verify --checkpoint: %v\n%s", err, out)
	}
	if fi, err := os.Stat(filepath.Join(outInc, "evidence.cbor")); err != nil || fi.Size() >= 16<<10 {
		t.Fatalf("incremental evidence: %v (not a delta?)", err)
	}
	key := sha256.Sum256([]byte("tls key"))
	runCmd(t, agentBin, "bind", "--purpose", "tls", "--key-hash", hex.EncodeToString(key[:]), "--control", control)
	out3 := filepath.Join(work, "bound")
	runCmd(t, agentBin, "attest", "--transport", "unix", "--unix", r.sock, "--control", control, "--nonce", "0a0b0a0b0a0b0a0b0a0b0a0b0a0b0a0b", "--out", out3)
	if code, rep, errs := runVerify(t, verifyBin, out3, "evidence.json", ""); code != 0 || rep.Counts.Measurements != 454 || rep.Counts.Bindings != 1 {
		t.Fatalf("verify after bind: exit %d %+v %s", code, rep, errs)
	}
	// bind --key PEM hashes the key as tpmmux-verify --bind-key does: the
	// verifier that requires that key accepts, one requiring another key
	// rejects (relay-attack countermeasure).
	tlsKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	writePub := func(name string, k *ecdsa.PrivateKey) string {
		der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		p := filepath.Join(work, name)
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
		return p
	}
	tlsPEM, otherPEM := writePub("tls.pem", tlsKey), writePub("other.pem", otherKey)
	runCmd(t, agentBin, "bind", "--purpose", "tls", "--key", tlsPEM, "--control", control)
	out4 := filepath.Join(work, "bound-pem")
	runCmd(t, agentBin, "attest", "--transport", "unix", "--unix", r.sock, "--control", control, "--nonce", "0c0d0c0d0c0d0c0d0c0d0c0d0c0d0c0d", "--out", out4)
	for _, tt := range []struct {
		key  string
		code int
	}{{tlsPEM, 0}, {otherPEM, 1}} {
		cmd := exec.Command(verifyBin, "--evidence", filepath.Join(out4, "evidence.json"), "--nonce", "0c0d0c0d0c0d0c0d0c0d0c0d0c0d0c0d",
			"--identity", filepath.Join(out4, "identity.json"), "--ak", filepath.Join(out4, "ak.pem"), "--bind-key", tt.key)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != tt.code || (tt.code == 1 && !strings.Contains(errb.String(), "is not bound in vm")) {
			t.Fatalf("--bind-key %s: exit %d: %s", filepath.Base(tt.key), code, errb.String())
		}
	}

	// 4. SIGTERM stops the agent cleanly (exit 0) and removes its socket.
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("agent exit: %v\n%s", err, agentLog.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not stop on SIGTERM")
	}
	if _, err := os.Stat(control); !os.IsNotExist(err) {
		t.Fatalf("control socket left: %v", err)
	}
	if log := agentLog.String(); strings.Contains(log, "level=ERROR") {
		t.Fatalf("agent logged errors:\n%s", log)
	}
}
