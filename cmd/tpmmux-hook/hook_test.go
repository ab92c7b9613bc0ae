package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
)

var hookBin string

// TestMain builds the real hook binary: the tests run it as libvirt does,
// a subprocess with argv DOMAIN OP SUBOP EXTRA and the XML on stdin.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tpmmux-hook-bin-")
	if err != nil {
		panic(err)
	}
	hookBin = filepath.Join(dir, "tpmmux-hook")
	out, err := exec.Command("go", "build", "-o", hookBin, ".").CombinedOutput()
	if err != nil {
		os.Stderr.Write(out)
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// domainXML is the dumpxml-style test domain (with <vsock> and the
// org.tpmmux.0 channel); attest is its metadata's enabled value, "" for
// no metadata.
func domainXML(t *testing.T, attest string) []byte {
	t.Helper()
	b, err := os.ReadFile("../../libvirt/testdata/vm-a.xml")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	switch attest {
	case "":
		i, j := strings.Index(s, "  <metadata>"), strings.Index(s, "</metadata>\n")
		s = s[:i] + s[j+len("</metadata>\n"):]
	default:
		s = strings.Replace(s, `enabled="yes"`, `enabled="`+attest+`"`, 1)
	}
	return []byte(s)
}

type result struct {
	code    int
	stdout  string
	stderr  string
	elapsed time.Duration
}

func (r result) lines() []string {
	s := strings.TrimRight(r.stderr, "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// hookEnv is a hook configuration in a temporary directory.
type hookEnv struct {
	t    *testing.T
	dir  string
	sock string
	cfg  string
}

func newHookEnv(t *testing.T, cfg map[string]any) *hookEnv {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmmux-hook-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := &hookEnv{t: t, dir: dir, sock: filepath.Join(dir, "control.sock"), cfg: filepath.Join(dir, "hook.json")}
	if cfg == nil {
		cfg = map[string]any{}
	}
	if _, ok := cfg["control_socket"]; !ok {
		cfg["control_socket"] = h.sock
	}
	if _, ok := cfg["serial_dir"]; !ok {
		// Never the host's /run/tpmmux/serial (the test XML's channel
		// path): no placeholder unless a test asks for one.
		cfg["serial_dir"] = filepath.Join(dir, "serial")
	}
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(h.cfg, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *hookEnv) run(stdin io.Reader, args ...string) result {
	h.t.Helper()
	cmd := exec.Command(hookBin, args...)
	cmd.Env = append(os.Environ(), "TPMMUX_HOOK_CONFIG="+h.cfg)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String(), elapsed: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		h.t.Fatal(err)
	}
	return r
}

// Fail-closed with the bridge down: exit 1, one line naming the socket,
// the timeout and the way out, within timeout + margin.
func TestFailClosedBridgeDown(t *testing.T) {
	h := newHookEnv(t, nil)
	r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-")
	t.Logf("fail-closed, no bridge: exit %d after %v: %s", r.code, r.elapsed.Round(time.Millisecond), r.stderr)
	if r.code == 0 {
		t.Fatal("prepare succeeded with the bridge down")
	}
	lines := r.lines()
	want := "tpmmux: bridge not answering on " + h.sock + " within 2s"
	if len(lines) != 1 || !strings.HasPrefix(lines[0], want) || !strings.HasSuffix(lines[0], "; start tpmmux-bridge or set fail_open in "+h.cfg) {
		t.Fatalf("stderr %q", r.stderr)
	}
	if r.elapsed > 3*time.Second {
		t.Fatalf("took %v, want < 3s", r.elapsed)
	}
	// started begin is just as critical.
	r = h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "started", "begin", "-")
	if r.code == 0 || len(r.lines()) != 1 || r.elapsed > 3*time.Second {
		t.Fatalf("started: %+v", r)
	}
}

// A bridge that accepts but never answers: the same, bounded by the
// timeout.
func TestFailClosedBridgeHung(t *testing.T) {
	h := newHookEnv(t, nil)
	l, err := net.Listen("unix", h.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go io.Copy(io.Discard, c)
		}
	}()
	r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-")
	t.Logf("fail-closed, hung bridge: exit %d after %v: %s", r.code, r.elapsed.Round(time.Millisecond), r.stderr)
	if r.code == 0 || len(r.lines()) != 1 || !strings.Contains(r.stderr, "not answering on "+h.sock+" within 2s") {
		t.Fatalf("result %+v", r)
	}
	if r.elapsed < 1900*time.Millisecond || r.elapsed > 3*time.Second {
		t.Fatalf("took %v, want the 2s timeout (< 3s)", r.elapsed)
	}
}

func TestFailOpen(t *testing.T) {
	h := newHookEnv(t, map[string]any{"fail_open": true, "timeout": "500ms"})
	r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-")
	t.Logf("fail-open: exit %d after %v: %s", r.code, r.elapsed.Round(time.Millisecond), r.stderr)
	if r.code != 0 || len(r.lines()) != 1 || !strings.Contains(r.stderr, "bridge not answering on "+h.sock+" within 500ms") {
		t.Fatalf("result %+v", r)
	}
	if r.elapsed > time.Second+500*time.Millisecond {
		t.Fatalf("took %v", r.elapsed)
	}
}

// An opted-out domain needs no bridge; on an opt-in host, neither does a
// domain without metadata.
func TestOptOutNeedsNoBridge(t *testing.T) {
	h := newHookEnv(t, nil)
	for _, op := range [][]string{{"prepare", "begin"}, {"started", "begin"}, {"stopped", "end"}, {"release", "end"}, {"reconnect", "begin"}} {
		r := h.run(bytes.NewReader(domainXML(t, "no")), "vm-a", op[0], op[1], "-")
		if r.code != 0 || r.stderr != "" || r.elapsed > time.Second {
			t.Fatalf("opted-out %s: %+v", op[0], r)
		}
	}
	in := newHookEnv(t, map[string]any{"mode": "opt-in"})
	if r := in.run(bytes.NewReader(domainXML(t, "")), "vm-a", "prepare", "begin", "-"); r.code != 0 || r.stderr != "" {
		t.Fatalf("opt-in host, no metadata: %+v", r)
	}
	if r := in.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-"); r.code == 0 {
		t.Fatal("opt-in host, opted-in domain: started without a bridge")
	}
	// On an opt-out host a domain without metadata takes part.
	if r := h.run(bytes.NewReader(domainXML(t, "")), "vm-a", "prepare", "begin", "-"); r.code == 0 {
		t.Fatal("opt-out host, no metadata: started without a bridge")
	}
}

// Every other op exits 0 at once and does not read stdin (here a pipe
// nobody ever writes to or closes).
func TestOtherOpsExitAtOnce(t *testing.T) {
	h := newHookEnv(t, nil)
	// An *os.File, so the child inherits it and Wait copies nothing.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	for _, args := range [][]string{
		{"vm-a", "start", "begin", "-"}, {"vm-a", "restore", "begin", "-"},
		{"vm-a", "attach", "begin", "-"}, {"vm-a", "prepare", "end", "-"}, {"vm-a", "stopped", "begin", "-"},
		{"vm-a", "release", "begin", "-"}, {"vm-a", "started", "end", "-"}, {"-", "shutdown", "shutdown", "-"},
	} {
		r := h.run(pr, args...)
		if r.code != 0 || r.stderr != "" || r.elapsed > 500*time.Millisecond {
			t.Fatalf("%v: %+v", args, r)
		}
	}
}

// stopped, release and reconnect never fail: libvirt ignores the first
// two, and kills a running domain whose reconnect hook fails.
func TestNonCriticalOpsNeverFail(t *testing.T) {
	h := newHookEnv(t, nil)
	for _, op := range [][]string{{"stopped", "end", "-"}, {"release", "end", "destroyed"}, {"reconnect", "begin", "-"}} {
		r := h.run(bytes.NewReader(domainXML(t, "yes")), append([]string{"vm-a"}, op...)...)
		if r.code != 0 || len(r.lines()) != 1 || !strings.Contains(r.stderr, "not delivered") || r.elapsed > time.Second {
			t.Fatalf("%s with the bridge down: %+v", op[0], r)
		}
	}
	// stopped/release with no XML on stdin still reach the bridge by name.
	if r := h.run(strings.NewReader(""), "vm-a", "release", "end", "shutdown"); r.code != 0 {
		t.Fatalf("release without XML: %+v", r)
	}
}

func TestBadConfig(t *testing.T) {
	h := newHookEnv(t, nil)
	os.WriteFile(h.cfg, []byte(`{"fail_open": tru`), 0o644)
	r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-")
	if r.code == 0 || len(r.lines()) != 1 || !strings.Contains(r.stderr, h.cfg) {
		t.Fatalf("bad config: %+v", r)
	}
	for in, want := range map[string]string{
		`{"failopen": true}`:    h.cfg + ": failopen: unknown key; did you mean fail_open?",
		`{"fail_open": "true"}`: h.cfg + `: fail_open: "true" is a string, want true or false`,
		"":                      h.cfg + ": the file is empty",
		"{\n\"mode\": opt-in}":  h.cfg + ":2:9: JSON syntax",
	} {
		os.WriteFile(h.cfg, []byte(in), 0o644)
		r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-")
		if r.code != 1 || len(r.lines()) != 1 || !strings.Contains(r.stderr, want) {
			t.Errorf("hook.json %q: %+v\nwant %q", in, r, want)
		}
	}
	os.WriteFile(h.cfg, []byte(`{"timeout": "forever"}`), 0o644)
	if r := h.run(bytes.NewReader(domainXML(t, "yes")), "vm-a", "prepare", "begin", "-"); r.code == 0 {
		t.Fatal("bad timeout accepted")
	}
}

// recorder is a bridge that records what the hook asks.
type recorder struct {
	mu   sync.Mutex
	reqs []string
	fail bool
}

func (r *recorder) add(s string) {
	r.mu.Lock()
	r.reqs = append(r.reqs, s)
	r.mu.Unlock()
}

func (r *recorder) Prepare(ctx context.Context, xml []byte, failOpen bool) (*control.VM, error) {
	r.add("prepare " + strings.SplitN(string(xml), "\n", 2)[0])
	if r.fail {
		return nil, errors.New("serial socket outside the serial dir")
	}
	return &control.VM{Name: "vm-a"}, nil
}
func (r *recorder) Started(ctx context.Context, name string, xml []byte) (*control.VM, error) {
	r.add("started " + name + " " + strings.SplitN(string(xml), "\n", 2)[0])
	return &control.VM{Name: name}, nil
}
func (r *recorder) Stopped(ctx context.Context, name, reason string) error {
	r.add("stopped " + name + " " + reason)
	return nil
}
func (r *recorder) Release(ctx context.Context, name, reason string) error {
	r.add("release " + name + " " + reason)
	return nil
}
func (r *recorder) Reconnect(ctx context.Context, xml []byte) (*control.VM, error) {
	r.add("reconnect " + strings.SplitN(string(xml), "\n", 2)[0])
	return &control.VM{Name: "vm-a"}, nil
}
func (r *recorder) MigrateBegin(ctx context.Context, name string, xml []byte) (*control.VM, error) {
	r.add("migrate " + name + " " + strings.SplitN(string(xml), "\n", 2)[0])
	if r.fail {
		return nil, errors.New("no peer reserved VM vm-a for migration here")
	}
	return &control.VM{Name: name}, nil
}
func (r *recorder) Status(ctx context.Context) (*control.Status, error) {
	return &control.Status{}, nil
}
func (r *recorder) VMs(ctx context.Context, all bool) ([]control.VM, error) { return nil, nil }
func (r *recorder) Evidence(ctx context.Context, vm string, nonce []byte) (*control.Evidence, error) {
	return nil, errors.New("no")
}

func TestForwardsToBridge(t *testing.T) {
	h := newHookEnv(t, nil)
	l, err := control.Listen(h.sock)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	s := &control.Server{Handler: rec}
	go s.Serve(l)
	defer s.Close()
	x := domainXML(t, "yes")
	for _, args := range [][]string{
		{"vm-a", "migrate", "begin", "-"},
		{"vm-a", "prepare", "begin", "-"}, {"vm-a", "started", "begin", "-"},
		{"vm-a", "stopped", "end", "-"}, {"vm-a", "release", "end", "destroyed"}, {"vm-a", "reconnect", "begin", "-"},
	} {
		// stdout stays empty: for migrate begin libvirt reads it as the
		// (unchanged) domain XML.
		if r := h.run(bytes.NewReader(x), args...); r.code != 0 || r.stderr != "" || r.stdout != "" {
			t.Fatalf("%v: %+v", args, r)
		}
	}
	want := []string{
		"migrate vm-a <domain type='qemu' id='1'>",
		"prepare <domain type='qemu' id='1'>", "started vm-a <domain type='qemu' id='1'>",
		"stopped vm-a -", "release vm-a destroyed", "reconnect <domain type='qemu' id='1'>",
	}
	if strings.Join(rec.reqs, "|") != strings.Join(want, "|") {
		t.Fatalf("bridge got %q", rec.reqs)
	}
	// The bridge refuses: one line with its reason, exit 1.
	rec.fail = true
	r := h.run(bytes.NewReader(x), "vm-a", "prepare", "begin", "-")
	if r.code != 1 || r.stderr != "tpmmux: prepare vm-a refused by the bridge: serial socket outside the serial dir\n" {
		t.Fatalf("refusal: %+v", r)
	}
	// A migration the bridge cannot set up fails the hook: libvirt
	// cancels the migration.
	r = h.run(bytes.NewReader(x), "vm-a", "migrate", "begin", "-")
	if r.code != 1 || r.stdout != "" || r.stderr != "tpmmux: migrate vm-a refused by the bridge: no peer reserved VM vm-a for migration here\n" {
		t.Fatalf("migrate refusal: %+v", r)
	}
}

// placeholderEnv is a hook whose serial_dir is a temporary directory, and
// the test domain's XML with its channel socket in it.
func placeholderEnv(t *testing.T, cfg map[string]any) (*hookEnv, string, func(attest string) []byte) {
	t.Helper()
	if cfg == nil {
		cfg = map[string]any{}
	}
	h := newHookEnv(t, cfg)
	dir := filepath.Join(h.dir, "serial")
	cfg["serial_dir"] = dir
	b, _ := json.Marshal(cfg)
	if err := os.WriteFile(h.cfg, b, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "vm-a.sock")
	return h, sock, func(attest string) []byte {
		return bytes.Replace(domainXML(t, attest), []byte("/run/tpmmux/serial/vm-a.sock"), []byte(sock), 1)
	}
}

// isPlaceholder says whether path is a socket that refuses connections.
func isPlaceholder(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return errors.New("not a socket")
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return errors.New("something listens on it")
	}
	return nil
}

// A domain that starts without the bridge (opted out, or failing open with
// the bridge down) finds a socket at its channel path, which libvirt's DAC
// labelling stats at start (issue 13: "unable to stat …sock" otherwise);
// release removes it again. Fail-closed leaves nothing behind.
func TestPlaceholderWhenStartingWithoutBridge(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cfg    map[string]any
		attest string
		code   int
		want   bool // a placeholder after prepare
	}{
		{"opted out", nil, "no", 0, true},
		{"opt-in host, no metadata", map[string]any{"mode": "opt-in"}, "", 0, true},
		{"fail-open, bridge down", map[string]any{"fail_open": true, "timeout": "300ms"}, "yes", 0, true},
		{"fail-closed, bridge down", map[string]any{"timeout": "300ms"}, "yes", 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, sock, xml := placeholderEnv(t, tc.cfg)
			r := h.run(bytes.NewReader(xml(tc.attest)), "vm-a", "prepare", "begin", "-")
			if r.code != tc.code {
				t.Fatalf("prepare: %+v, want exit %d", r, tc.code)
			}
			err := isPlaceholder(sock)
			if tc.want && err != nil {
				t.Fatalf("no placeholder at %s after prepare: %v", sock, err)
			}
			if !tc.want {
				if _, err := os.Lstat(sock); err == nil {
					t.Fatalf("fail-closed prepare left a file at %s", sock)
				}
				return
			}
			r = h.run(bytes.NewReader(xml(tc.attest)), "vm-a", "release", "end", "destroyed")
			if r.code != 0 {
				t.Fatalf("release: %+v", r)
			}
			if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("placeholder still there after release: %v", err)
			}
		})
	}
}

// The hook never touches what is not its placeholder: a socket someone
// listens on (the bridge's) survives release, a path outside serial_dir
// gets nothing, and a regular file at the path is reported, not replaced.
func TestPlaceholderLeavesOthersAlone(t *testing.T) {
	h, sock, xml := placeholderEnv(t, map[string]any{"fail_open": true, "timeout": "300ms"})
	os.MkdirAll(filepath.Dir(sock), 0o755)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if r := h.run(bytes.NewReader(xml("no")), "vm-a", "release", "end", "destroyed"); r.code != 0 {
		t.Fatalf("release: %+v", r)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("release removed a live listener's socket: %v", err)
	}
	l.Close()

	// Outside serial_dir.
	out := filepath.Join(h.dir, "elsewhere", "vm-a.sock")
	if r := h.run(bytes.NewReader(bytes.Replace(xml("no"), []byte(sock), []byte(out), 1)), "vm-a", "prepare", "begin", "-"); r.code != 0 || r.stderr != "" {
		t.Fatalf("prepare: %+v", r)
	}
	if _, err := os.Lstat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a placeholder was made outside serial_dir: %v", err)
	}

	os.WriteFile(sock, []byte("x"), 0o644)
	r := h.run(bytes.NewReader(xml("no")), "vm-a", "prepare", "begin", "-")
	if r.code != 0 || !strings.Contains(r.stderr, "exists and is not a socket") {
		t.Fatalf("prepare over a regular file: %+v", r)
	}
	if b, _ := os.ReadFile(sock); string(b) != "x" {
		t.Fatal("the regular file was replaced")
	}
}

// A domain whose TPM the bridge serves (vTPM mode: an external <tpm>
// backend with its socket in the bridge's runtime directory) cannot start
// without the bridge: fail_open does not apply to it, and opting it out is
// refused with the fix; a TPM socket elsewhere is not the bridge's.
func TestVTPMDomainNeverFailsOpen(t *testing.T) {
	h, _, xml := placeholderEnv(t, map[string]any{"fail_open": true, "timeout": "300ms"})
	runDir := h.dir // the parent of serial_dir
	withTPM := func(attest, sock string) []byte {
		tpm := `<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='` + sock + `'/></backend></tpm>`
		return bytes.Replace(xml(attest), []byte("<devices>"), []byte("<devices>"+tpm), 1)
	}
	bridges := filepath.Join(runDir, "vtpm", "vm-a.sock")
	for _, op := range [][]string{{"prepare", "begin"}, {"started", "begin"}} {
		r := h.run(bytes.NewReader(withTPM("yes", bridges)), "vm-a", op[0], op[1], "-")
		if r.code != 1 || len(r.lines()) != 1 || !strings.Contains(r.stderr, "fail_open does not apply: the bridge serves this domain's vTPM") {
			t.Fatalf("%s, vTPM domain, bridge down, fail_open: %+v", op[0], r)
		}
	}
	r := h.run(bytes.NewReader(withTPM("no", bridges)), "vm-a", "prepare", "begin", "-")
	if r.code != 1 || !strings.Contains(r.stderr, "is the bridge's vTPM at "+bridges) || !strings.Contains(r.stderr, "remove the <tpm> device or the opt-out") {
		t.Fatalf("opted-out vTPM domain: %+v", r)
	}
	// stopped and release still never fail.
	if r := h.run(bytes.NewReader(withTPM("yes", bridges)), "vm-a", "release", "end", "destroyed"); r.code != 0 {
		t.Fatalf("release: %+v", r)
	}
	// Someone else's external TPM: fail_open applies as usual.
	other := filepath.Join(t.TempDir(), "tpm.sock")
	if r := h.run(bytes.NewReader(withTPM("yes", other)), "vm-a", "prepare", "begin", "-"); r.code != 0 {
		t.Fatalf("another process's TPM, fail_open: %+v", r)
	}
}
