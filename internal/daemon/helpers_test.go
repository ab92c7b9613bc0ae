package daemon

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// env is one test host: a simulator TPM kept across daemon restarts, and
// temporary state and socket directories.
type env struct {
	t   testing.TB
	dir string
	cfg Config
	tp  tpm.TPM
	d   *Daemon
	log *testLog
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvTPM(t, "sim")
}

// newEnvTPM is newEnv on the TPM spec names (a swtpm for a second host:
// the simulator is one per process).
func newEnvTPM(t testing.TB, spec string) *env {
	t.Helper()
	tp, err := tpm.Open(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	// Short paths: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "tpmmux-d-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, dir: dir, tp: tp, log: &testLog{t: t}}
	cfg := DefaultConfig()
	cfg.TPM = "sim"
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.ControlSocket = filepath.Join(dir, "run", "control.sock")
	cfg.SerialDir = filepath.Join(dir, "run", "serial")
	cfg.GuestUnixDir = filepath.Join(dir, "run", "guest")
	cfg.VTPMDir = filepath.Join(dir, "run", "vtpm")
	cfg.Vsock = "off"
	cfg.Metrics = "127.0.0.1:0"
	cfg.StopGrace = Duration(300 * time.Millisecond)
	// Concealment stays on (the default), with a short slot: a lone
	// record (a genesis, a teardown) waits for the next slot.
	cfg.Conceal.Interval = Duration(20 * time.Millisecond)
	e.cfg = cfg
	t.Cleanup(func() {
		if e.d != nil {
			e.d.Shutdown()
		}
		e.log.stop()
		tp.Close()
		os.RemoveAll(dir)
	})
	return e
}

func (e *env) start() *Daemon {
	e.t.Helper()
	d, err := Start(context.Background(), e.cfg, Options{TPM: e.tp, Version: "test", Logger: e.log.logger()})
	if err != nil {
		e.t.Fatal(err)
	}
	e.d = d
	return d
}

func (e *env) stop() {
	e.t.Helper()
	if err := e.d.Shutdown(); err != nil {
		e.t.Fatal(err)
	}
	e.d = nil
}

func (e *env) call(req *control.Request) (*control.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return (&control.Client{Path: e.cfg.ControlSocket}).Call(ctx, req)
}

func (e *env) mustCall(req *control.Request) *control.Response {
	e.t.Helper()
	resp, err := e.call(req)
	if err != nil {
		e.t.Fatalf("%s: %v", req.Op, err)
	}
	return resp
}

func (e *env) serialPath(name string) string { return filepath.Join(e.cfg.SerialDir, name+".sock") }

// domainXML is libvirt/testdata/vm-a.xml (as virsh dumpxml prints it, with
// <vsock> and the org.tpmmux.0 <channel>) renamed and pointed at this
// env's serial directory.
func (e *env) domainXML(name, uuid string) string {
	e.t.Helper()
	b, err := os.ReadFile("../../libvirt/testdata/vm-a.xml")
	if err != nil {
		e.t.Fatal(err)
	}
	s := strings.ReplaceAll(string(b), "/run/tpmmux/serial/vm-a.sock", e.serialPath(name))
	s = strings.ReplaceAll(s, "<name>vm-a</name>", "<name>"+name+"</name>")
	if uuid != "" {
		s = strings.ReplaceAll(s, "6f1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a697", uuid)
	}
	return s
}

func (e *env) metrics() string {
	e.t.Helper()
	resp, err := http.Get("http://" + e.d.MetricsAddr() + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// testLog sends the daemon's logs to the test log while the test runs.
type testLog struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
	buf  bytes.Buffer
}

func (l *testLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if !l.done && testing.Verbose() {
		l.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (l *testLog) stop() {
	l.mu.Lock()
	l.done = true
	l.mu.Unlock()
}

func (l *testLog) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.buf.String(), s)
}

func (l *testLog) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
