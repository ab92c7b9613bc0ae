package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/daemon"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/wire"
	"github.com/tpmmux/tpmmux/internal/wire/wiretest"
)

// These tests run the host side as it is installed: the daemon (in
// process on "sim", or `tpmmux-bridge run` as a subprocess on swtpm), the
// real tpmmux-hook binary with libvirt's argv and a dumpxml-style domain
// XML on stdin, a guest speaking the wire protocol on the VM's sockets,
// the evidence command and the real tpmmux-verify binary.

var (
	toolsOnce sync.Once
	toolsDir  string
	toolsErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if toolsDir != "" {
		os.RemoveAll(toolsDir)
	}
	os.Exit(code)
}

// tool builds (once) and returns the path of cmd/NAME.
func tool(t *testing.T, name string) string {
	t.Helper()
	toolsOnce.Do(func() {
		toolsDir, toolsErr = os.MkdirTemp("", "tpmmux-tools-")
		if toolsErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", toolsDir+"/", "../tpmmux-hook", "../tpmmux-verify", ".")
		if out, err := cmd.CombinedOutput(); err != nil {
			toolsErr = errors.New(string(out))
		}
	})
	if toolsErr != nil {
		t.Fatalf("build tools: %v", toolsErr)
	}
	return filepath.Join(toolsDir, name)
}

// host is a temporary host layout: state, control socket, serial and dev
// socket directories, and the hook's configuration.
type host struct {
	t       *testing.T
	dir     string
	cfg     daemon.Config
	hookCfg string
	// xmlOverride, when set, is the domain XML the hook is given.
	xmlOverride []byte
}

func newHost(t *testing.T) *host {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmmux-h-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := daemon.DefaultConfig()
	cfg.TPM = "sim"
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.ControlSocket = filepath.Join(dir, "run", "control.sock")
	cfg.SerialDir = filepath.Join(dir, "run", "serial")
	cfg.GuestUnixDir = filepath.Join(dir, "run", "guest")
	cfg.Vsock = "off"
	cfg.Metrics = "127.0.0.1:0"
	cfg.StopGrace = daemon.Duration(5 * time.Second)
	h := &host{t: t, dir: dir, cfg: cfg, hookCfg: filepath.Join(dir, "hook.json")}
	b, _ := json.Marshal(map[string]any{"control_socket": cfg.ControlSocket})
	if err := os.WriteFile(h.hookCfg, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *host) serial(name string) string { return filepath.Join(h.cfg.SerialDir, name+".sock") }

// xml is libvirt/testdata/vm-a.xml, as virsh dumpxml prints a running
// domain (<vsock> with CID 42, the org.tpmmux.0 channel), pointed at this
// host's serial directory.
func (h *host) xml() []byte {
	if h.xmlOverride != nil {
		return h.xmlOverride
	}
	b, err := os.ReadFile("../../libvirt/testdata/vm-a.xml")
	if err != nil {
		h.t.Fatal(err)
	}
	return bytes.ReplaceAll(b, []byte("/run/tpmmux/serial/vm-a.sock"), []byte(h.serial("vm-a")))
}

// hook runs the real hook as libvirt would.
func (h *host) hook(args ...string) (int, string, time.Duration) {
	h.t.Helper()
	cmd := exec.Command(tool(h.t, "tpmmux-hook"), args...)
	cmd.Env = append(os.Environ(), "TPMMUX_HOOK_CONFIG="+h.hookCfg)
	cmd.Stdin = bytes.NewReader(h.xml())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	el := time.Since(start)
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), stderr.String(), el
	}
	if err != nil {
		h.t.Fatal(err)
	}
	return 0, stderr.String(), el
}

func (h *host) mustHook(args ...string) {
	h.t.Helper()
	if code, stderr, _ := h.hook(args...); code != 0 || stderr != "" {
		h.t.Fatalf("hook %v: exit %d: %s", args, code, stderr)
	}
}

// cli runs a tpmmux-bridge admin command in process.
func (h *host) cli(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), append(args[:1:1], append([]string{"--control", h.cfg.ControlSocket}, args[1:]...)...), &out, &errb)
	return code, out.String(), errb.String()
}

// verifyFiles runs tpmmux-verify on an evidence directory and returns the
// number of measurements it verified.
func verifyFiles(t *testing.T, dir string, extra ...string) int {
	t.Helper()
	args := append([]string{"--evidence", filepath.Join(dir, "evidence.json"), "--identity", filepath.Join(dir, "identity.json"),
		"--ak", filepath.Join(dir, "ak.pem"), "--json"}, extra...)
	cmd := exec.Command(tool(t, "tpmmux-verify"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("tpmmux-verify rejected the evidence: %v\n%s", err, stderr.String())
	}
	var rep struct {
		Counts struct {
			Measurements int `json:"measurements"`
		} `json:"counts"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("verify report: %v\n%s", err, stdout.String())
	}
	return rep.Counts.Measurements
}

// TestHostFlow: hook prepare → identity → a guest streams a real IMA list
// over the VM's virtio-serial socket → `tpmmux-bridge evidence` writes the
// files → tpmmux-verify accepts them → hook stopped end + release end →
// one teardown, listeners closed.
func TestHostFlow(t *testing.T) {
	h := newHost(t)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(t.Output(), nil))
	}
	d, err := daemon.Start(t.Context(), h.cfg, daemon.Options{Version: version, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown()

	h.mustHook("vm-a", "prepare", "begin", "-")
	h.mustHook("vm-a", "started", "begin", "-")
	code, out, stderr := h.cli("vms")
	if f := strings.Fields(strings.Split(out, "\n")[1]); code != 0 || len(f) < 9 || f[0] != "vm-a" || f[1] != "live" ||
		f[2] != "6f1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a697" || f[5] != "42" || !strings.Contains(out, "virtio-serial:"+h.serial("vm-a")) {
		t.Fatalf("vms: exit %d\n%s%s", code, out, stderr)
	}

	es := wiretest.Entries(t, "../../internal/ima/testdata/guest-imasig-sha256.bin")
	a := wiretest.DialUnix(t, h.serial("vm-a"), true)
	if w := a.Hello("boot-1"); w.VM != "vm-a" || w.Resume != 0 {
		t.Fatalf("welcome %+v", w)
	}
	a.Stream(es, 0, len(es))

	resp, err := http.Get("http://" + d.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	mb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{"tpmmux_ingest_records_total 455", `tpmmux_vm_records{vm="vm-a"} 455`, "tpmmux_live_sessions 1", "tpmmux_live_vms 1"} {
		if !strings.Contains(string(mb), want) {
			t.Errorf("metrics lack %q", want)
		}
	}

	evDir := filepath.Join(h.dir, "ev")
	nonce := "c0ffee0123456789c0ffee0123456789"
	code, out, stderr = h.cli("evidence", "--vm", "vm-a", "--nonce", nonce, "--out", evDir)
	if code != 0 {
		t.Fatalf("evidence: exit %d: %s", code, stderr)
	}
	for _, f := range []string{"evidence.json", "evidence.cbor", "identity.json", "ak.pem", "nonce.hex", "quote.msg", "quote.sig"} {
		fi, err := os.Stat(filepath.Join(evDir, f))
		if err != nil || fi.Size() == 0 {
			t.Fatalf("%s: %v", f, err)
		}
		if f == "identity.json" && fi.Mode().Perm() != 0o600 {
			t.Fatalf("identity.json mode %v, want 0600", fi.Mode().Perm())
		}
	}
	cp := filepath.Join(h.dir, "checkpoint.json")
	if n := verifyFiles(t, evDir, "--nonce", nonce, "--save-checkpoint", cp); n != len(es) {
		t.Fatalf("tpmmux-verify: %d measurements, want %d", n, len(es))
	}
	if !strings.Contains(out, "tpmmux-verify --evidence") {
		t.Fatalf("evidence output: %s", out)
	}
	// The delta since the verifier's checkpoint, through the control
	// socket: tpmmux-verify --checkpoint accepts it.
	incDir := filepath.Join(h.dir, "ev-inc")
	if code, out, stderr := h.cli("evidence", "--vm", "vm-a", "--nonce", "01230123012301230123012301230123", "--out", incDir, "--checkpoint", cp); code != 0 || !strings.Contains(out, "--checkpoint "+cp) {
		t.Fatalf("evidence --checkpoint: exit %d: %s%s", code, out, stderr)
	}
	verifyFiles(t, incDir, "--nonce", "01230123012301230123012301230123", "--checkpoint", cp)
	if fi, err := os.Stat(filepath.Join(incDir, "evidence.cbor")); err != nil || fi.Size() >= 16<<10 {
		t.Fatalf("incremental evidence: %v (not a delta?)", err)
	}

	// libvirt stops the domain: stopped end, then release end with the
	// shutoff reason; both hooks fire, the teardown happens once.
	h.mustHook("vm-a", "stopped", "end", "-")
	h.mustHook("vm-a", "release", "end", "destroyed")
	if _, err := os.Stat(h.serial("vm-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("serial socket still open after the stop")
	}
	if _, err := net.Dial("unix", filepath.Join(h.cfg.GuestUnixDir, "vm-a.sock")); err == nil {
		t.Fatal("dev socket still open after the stop")
	}
	h.mustHook("vm-a", "stopped", "end", "-")
	h.mustHook("vm-a", "release", "end", "destroyed")
	code, out, _ = h.cli("vms", "--all", "--json")
	var vms []control.VM
	if code != 0 || json.Unmarshal([]byte(out), &vms) != nil || len(vms) != 1 {
		t.Fatalf("vms --all: %s", out)
	}
	if v := vms[0]; v.Live || v.EndedBy != "destroyed" || v.Records != uint64(len(es)+2) || len(v.Listeners) != 0 {
		t.Fatalf("after stop: %+v (want one teardown: %d records)", v, len(es)+2)
	}
	// The ended VM's post-mortem evidence still verifies. Its quote holds
	// no nonce, so no nonce.hex is written (not even a stale one stays).
	pmDir := filepath.Join(h.dir, "pm")
	os.MkdirAll(pmDir, 0o755)
	os.WriteFile(filepath.Join(pmDir, "nonce.hex"), []byte("00\n"), 0o644)
	if code, _, stderr := h.cli("evidence", "--vm", "vm-a", "--nonce", "00", "--out", pmDir); code != 0 {
		t.Fatalf("post-mortem evidence: %s", stderr)
	}
	if n := verifyFiles(t, pmDir, "--post-mortem"); n != len(es) {
		t.Fatalf("post-mortem: %d measurements", n)
	}
	if _, err := os.Stat(filepath.Join(pmDir, "nonce.hex")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("post-mortem evidence left a nonce.hex whose nonce is not in its quote: %v", err)
	}
	code, out, _ = h.cli("status")
	if code != 0 || !strings.Contains(out, "0 live") || !strings.Contains(out, "fault:       none") {
		t.Fatalf("status: %s", out)
	}
}

// bridgeProc is `tpmmux-bridge run` as a subprocess.
type bridgeProc struct {
	cmd  *exec.Cmd
	logs *syncBuffer
	done chan error
}

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

func (h *host) startBridge(spec string) *bridgeProc {
	h.t.Helper()
	return h.startBridgeCmd(exec.Command(tool(h.t, "tpmmux-bridge"), "run", "--config", filepath.Join(h.dir, "bridge.json"), "--tpm", spec))
}

// startBridgeCmd writes h.cfg to bridge.json, starts cmd (a
// `tpmmux-bridge run` reading it) and waits for its control socket.
func (h *host) startBridgeCmd(cmd *exec.Cmd) *bridgeProc {
	h.t.Helper()
	b, _ := json.Marshal(h.cfg)
	if err := os.WriteFile(filepath.Join(h.dir, "bridge.json"), b, 0o644); err != nil {
		h.t.Fatal(err)
	}
	p := &bridgeProc{cmd: cmd, logs: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.logs
	if err := cmd.Start(); err != nil {
		h.t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	h.t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
	})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := (&control.Client{Path: h.cfg.ControlSocket, RetryDial: true}).Call(ctx, &control.Request{Op: control.OpStatus}); err != nil {
		h.t.Fatalf("bridge did not come up: %v\n%s", err, p.logs.String())
	}
	return p
}

// term sends SIGTERM and returns the exit code and how long the exit took.
func (p *bridgeProc) term(t *testing.T) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), time.Since(start)
		}
		return 0, time.Since(start)
	case <-time.After(20 * time.Second):
		t.Fatalf("bridge did not exit on SIGTERM\n%s", p.logs.String())
	}
	return -1, 0
}

// TestRunSIGTERMAndRestart runs `tpmmux-bridge run` on swtpm: SIGTERM
// while a guest streams ends it cleanly (exit 0, queued batch committed);
// the restarted bridge replays the store against the PCR, reopens the live
// VM's serial socket, and the guest resumes with nothing lost or doubled.
func TestRunSIGTERMAndRestart(t *testing.T) {
	sw := swtpmproc.StartTest(t)
	h := newHost(t)
	h.cfg.Metrics = ""
	p := h.startBridge(sw.Spec())
	h.mustHook("vm-a", "prepare", "begin", "-")
	es := wiretest.Entries(t, "../../internal/ima/testdata/guest-imasig-sha256.bin")
	half := len(es) / 2
	a := wiretest.DialUnix(t, h.serial("vm-a"), true)
	a.Hello("boot-1")
	a.Stream(es, 0, half)
	// More in flight when the signal comes.
	a.C.Send(wire.TypeMeasurements, &wire.Measurements{Seq: 100, First: uint64(half), Entries: es[half : half+50]})
	code, took := p.term(t)
	t.Logf("SIGTERM: exit %d after %v", code, took.Round(time.Millisecond))
	if code != 0 || !strings.Contains(p.logs.String(), "tpmmux bridge stopped") {
		t.Fatalf("exit %d\n%s", code, p.logs.String())
	}
	if _, err := os.Stat(h.cfg.ControlSocket); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("control socket left behind")
	}

	p = h.startBridge(sw.Spec())
	logs := p.logs.String()
	if !strings.Contains(logs, "log store replays to the PCR") || !strings.Contains(logs, "live VM re-adopted") {
		t.Fatalf("restart did not replay and re-adopt:\n%s", logs)
	}
	code, out, _ := h.cli("status", "--json")
	var st control.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Epoch != 1 || st.Fault != "" || st.LiveVMs != 1 {
		t.Fatalf("status after restart: %s", out)
	}
	a = wiretest.DialUnix(t, h.serial("vm-a"), true)
	w := a.Hello("boot-1")
	if w.Resume < uint64(half) || w.Resume > uint64(half+50) {
		t.Fatalf("resume at %d, want %d..%d", w.Resume, half, half+50)
	}
	a.Stream(es, int(w.Resume), len(es))
	evDir := filepath.Join(h.dir, "ev")
	nonce := hex.EncodeToString([]byte("after restart of the bridge"))
	if code, _, stderr := h.cli("evidence", "--vm", "vm-a", "--nonce", nonce, "--out", evDir); code != 0 {
		t.Fatalf("evidence: %s", stderr)
	}
	if n := verifyFiles(t, evDir, "--nonce", nonce); n != len(es) {
		t.Fatalf("%d measurements after the restart, want %d (none lost or doubled)", n, len(es))
	}
	h.mustHook("vm-a", "stopped", "end", "-")
	h.mustHook("vm-a", "release", "end", "shutdown")
	if code, _ := p.term(t); code != 0 {
		t.Fatalf("second SIGTERM: exit %d\n%s", code, p.logs.String())
	}
}

// With no TPM device the daemon says so in one line and names the
// alternatives.
func TestRunNoTPM(t *testing.T) {
	h := newHost(t)
	cmd := exec.Command(tool(t, "tpmmux-bridge"), "run", "--tpm", "device:"+filepath.Join(h.dir, "tpmrm0"),
		"--state-dir", h.cfg.StateDir, "--control", h.cfg.ControlSocket)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit: %v", err)
	}
	want := "tpmmux-bridge: no TPM at " + filepath.Join(h.dir, "tpmrm0") + " (use --tpm swtpm:HOST:PORT for a software TPM, or --tpm sim for the in-process simulator: testing only)\n"
	if stderr.String() != want {
		t.Fatalf("stderr %q, want %q", stderr.String(), want)
	}
	// A non-loopback metrics address is refused before anything starts.
	cmd = exec.Command(tool(t, "tpmmux-bridge"), "run", "--tpm", "sim", "--metrics", "0.0.0.0:9464", "--state-dir", h.cfg.StateDir)
	stderr.Reset()
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || !strings.Contains(stderr.String(), "is not a loopback address") || strings.Count(stderr.String(), "\n") != 1 {
		t.Fatalf("non-loopback metrics: %v %q", err, stderr.String())
	}
}

// --log-format json (log_format in bridge.json): every line the daemon
// logs is one JSON object with its time, level and message, for journald
// and log shippers.
func TestRunLogFormatJSON(t *testing.T) {
	sw := swtpmproc.StartTest(t)
	h := newHost(t)
	h.cfg.Metrics = ""
	h.cfg.LogFormat = "json"
	p := h.startBridge(sw.Spec())
	if code, _ := p.term(t); code != 0 {
		t.Fatalf("SIGTERM: exit %d\n%s", code, p.logs.String())
	}
	lines := strings.Split(strings.TrimRight(p.logs.String(), "\n"), "\n")
	if len(lines) < 2 {
		t.Fatalf("%d log lines:\n%s", len(lines), p.logs.String())
	}
	for _, l := range lines {
		var rec struct {
			Time  time.Time `json:"time"`
			Level string    `json:"level"`
			Msg   string    `json:"msg"`
		}
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec.Time.IsZero() || rec.Level == "" || rec.Msg == "" {
			t.Fatalf("log line %q is not a JSON record: %v", l, err)
		}
	}
	if !strings.Contains(p.logs.String(), `"msg":"tpmmux bridge stopped"`) {
		t.Fatalf("no stop record:\n%s", p.logs.String())
	}
}
