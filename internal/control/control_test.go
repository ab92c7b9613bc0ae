package control

import (
	"context"
	"errors"
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
)

// fakeHandler answers every op; prepare can be slowed down.
type fakeHandler struct {
	mu          sync.Mutex
	prepareWait time.Duration
	undone      []string
	calls       []string
}

func (h *fakeHandler) note(s string) {
	h.mu.Lock()
	h.calls = append(h.calls, s)
	h.mu.Unlock()
}

func (h *fakeHandler) Prepare(ctx context.Context, xml []byte, failOpen bool) (*VM, error) {
	h.note("prepare")
	if h.prepareWait > 0 {
		time.Sleep(h.prepareWait)
	}
	if strings.Contains(string(xml), "bad") {
		return nil, errors.New("bad domain")
	}
	return &VM{Name: "vm-a", UUID: "u", ID: "00", Live: true}, nil
}
func (h *fakeHandler) Started(ctx context.Context, name string, xml []byte) (*VM, error) {
	h.note("started " + name)
	return &VM{Name: name}, nil
}
func (h *fakeHandler) Stopped(ctx context.Context, name, reason string) error {
	h.note("stopped " + name + " " + reason)
	return nil
}
func (h *fakeHandler) Release(ctx context.Context, name, reason string) error {
	h.note("release " + name + " " + reason)
	return nil
}
func (h *fakeHandler) Reconnect(ctx context.Context, xml []byte) (*VM, error) {
	return &VM{Name: "vm-a"}, nil
}
func (h *fakeHandler) Status(ctx context.Context) (*Status, error) {
	return &Status{Version: "test", Epoch: 7}, nil
}
func (h *fakeHandler) VMs(ctx context.Context, all bool) ([]VM, error) { return nil, nil }
func (h *fakeHandler) Evidence(ctx context.Context, vm string, nonce []byte) (*Evidence, error) {
	return &Evidence{VM: vm, Evidence: append([]byte{0xa1}, nonce...), AKPEM: "pem"}, nil
}
func (h *fakeHandler) UndoPrepare(ctx context.Context, vm *VM, cause error) {
	h.mu.Lock()
	h.undone = append(h.undone, vm.Name)
	h.mu.Unlock()
}

func serve(t *testing.T, h Handler, mod func(*Server)) (string, *Server) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "control.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Handler: h}
	if mod != nil {
		mod(s)
	}
	done := make(chan struct{})
	go func() { s.Serve(l); close(done) }()
	t.Cleanup(func() { s.Close(); <-done })
	return path, s
}

func TestRoundTrip(t *testing.T) {
	h := &fakeHandler{}
	path, _ := serve(t, h, nil)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	c := &Client{Path: path}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.Call(ctx, &Request{Op: OpStatus})
	if err != nil || resp.Status == nil || resp.Status.Epoch != 7 {
		t.Fatalf("status: %+v %v", resp, err)
	}
	resp, err = c.Call(ctx, &Request{Op: OpEvidence, VM: "vm-a", Nonce: []byte{1, 2}})
	if err != nil || resp.Evidence == nil || string(resp.Evidence.Evidence) != "\xa1\x01\x02" {
		t.Fatalf("evidence: %+v %v", resp, err)
	}
	// The XML travels unescaped and intact.
	xml := "<domain><name>a&b</name></domain>"
	if _, err := c.Call(ctx, &Request{Op: OpPrepare, XML: xml}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Call(ctx, &Request{Op: OpPrepare, XML: "<bad/>"})
	var re *RemoteError
	if !errors.As(err, &re) || re.Msg != "bad domain" {
		t.Fatalf("remote error: %v", err)
	}
	_, err = c.Call(ctx, &Request{Op: "frobnicate"})
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "unknown op") {
		t.Fatalf("unknown op: %v", err)
	}
	if _, err := c.Call(ctx, &Request{Op: OpRelease, Name: "vm-a", Reason: "destroyed"}); err != nil {
		t.Fatal(err)
	}
	if got := h.calls[len(h.calls)-1]; got != "release vm-a destroyed" {
		t.Fatalf("last call %q", got)
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	path, _ := serve(t, &fakeHandler{}, nil)
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "another tpmmux-bridge") {
		t.Fatalf("second listen: %v", err)
	}
	// A stale socket (nobody listening) is replaced.
	stale := filepath.Join(t.TempDir(), "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	l2, err := Listen(stale)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
}

func TestPeerCheck(t *testing.T) {
	path, _ := serve(t, &fakeHandler{}, func(s *Server) { s.AllowUID = func(uid uint32) bool { return false } })
	c := &Client{Path: path}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := c.Call(ctx, &Request{Op: OpStatus})
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(re.Msg, "permission denied: peer uid") {
		t.Fatalf("refused peer: %v", err)
	}
}

// TestNonRootPeerRefused runs a real client as user nobody against a
// socket whose mode would let it in: SO_PEERCRED keeps it out.
func TestNonRootPeerRefused(t *testing.T) {
	if os.Getenv("TPMMUX_CONTROL_HELPER") != "" {
		t.Skip("helper mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user")
	}
	dir, err := os.MkdirTemp("", "tpmmux-ctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	path, _ := serve(t, &fakeHandler{}, nil)
	// Move the socket where nobody can reach it and open its mode.
	open := filepath.Join(dir, "open.sock")
	if err = os.Link(path, open); err != nil {
		t.Fatal(err)
	}
	os.Chmod(open, 0o666)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "control.test")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestHelperClient$", "-test.v")
	cmd.Env = append(os.Environ(), "TPMMUX_CONTROL_HELPER="+open)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if !strings.Contains(string(out), "HELPER: permission denied: peer uid 65534 is not root") {
		t.Fatalf("non-root client was not refused (%v):\n%s", err, out)
	}
	// With the socket's own mode 0600 (the link shares its inode), nobody
	// cannot even connect.
	os.Chmod(open, 0o600)
	cmd = exec.Command(bin, "-test.run=^TestHelperClient$", "-test.v")
	cmd.Env = append(os.Environ(), "TPMMUX_CONTROL_HELPER="+open)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, _ = cmd.CombinedOutput()
	if !strings.Contains(string(out), "HELPER: bridge not answering") || !strings.Contains(string(out), "connect: permission denied") {
		t.Fatalf("non-root client reached a 0600 socket:\n%s", out)
	}
}

// TestHelperClient is the client half of TestNonRootPeerRefused.
func TestHelperClient(t *testing.T) {
	path := os.Getenv("TPMMUX_CONTROL_HELPER")
	if path == "" {
		t.Skip("helper for TestNonRootPeerRefused")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := (&Client{Path: path}).Call(ctx, &Request{Op: OpStatus})
	t.Logf("HELPER: %v", err)
}

func TestClientTimeoutOnSilentServer(t *testing.T) {
	path := filepath.Join(t.TempDir(), "silent.sock")
	l, err := net.Listen("unix", path)
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
			go io.Copy(io.Discard, c) // reads, never answers
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = (&Client{Path: path}).Call(ctx, &Request{Op: OpStatus})
	el := time.Since(start)
	if !IsUnreachable(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	if el < 250*time.Millisecond || el > 1500*time.Millisecond {
		t.Fatalf("gave up after %v, want about 300ms", el)
	}
}

func TestClientRetriesUntilBridgeComesUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "late.sock")
	go func() {
		time.Sleep(300 * time.Millisecond)
		l, err := Listen(path)
		if err != nil {
			return
		}
		s := &Server{Handler: &fakeHandler{}}
		t.Cleanup(func() { s.Close() })
		s.Serve(l)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := (&Client{Path: path}).Call(ctx, &Request{Op: OpStatus}); !IsUnreachable(err) {
		t.Fatalf("without retry: %v", err)
	}
	resp, err := (&Client{Path: path, RetryDial: true}).Call(ctx, &Request{Op: OpStatus})
	if err != nil || resp.Status == nil {
		t.Fatalf("with retry: %v", err)
	}
}

// A prepare whose answer comes after a fail-closed client gave up is
// undone; under fail-open it is kept.
func TestUndoPrepareAfterClientGaveUp(t *testing.T) {
	h := &fakeHandler{prepareWait: 400 * time.Millisecond}
	path, _ := serve(t, h, nil)
	for _, failOpen := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		_, err := (&Client{Path: path}).Call(ctx, &Request{Op: OpPrepare, XML: "<domain/>", FailOpen: failOpen})
		cancel()
		if !IsUnreachable(err) {
			t.Fatalf("err = %v", err)
		}
	}
	time.Sleep(time.Second)
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.undone) != 1 {
		t.Fatalf("undone %v, want one (the fail-closed prepare)", h.undone)
	}
}

func TestBadRequest(t *testing.T) {
	path, _ := serve(t, &fakeHandler{}, nil)
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("{not json\n"))
	c.(*net.UnixConn).CloseWrite()
	b, _ := io.ReadAll(c)
	if !strings.Contains(string(b), "bad request") {
		t.Fatalf("answer %q", b)
	}
}
