package transport

// Tests on a real AF_VSOCK stack. This host's kernel has neither
// vhost_vsock nor vsock_loopback, so they skip here; scripts/vmtest/run.sh
// boots a QEMU guest whose kernel has vsock_loopback loaded, runs them there
// with TPMMUX_VSOCK_REAL=1 and fails if any of them skipped.
//
// Over vsock_loopback every connection's peer CID is 1 (VMADDR_CID_LOCAL).
// The guest also has vhost_vsock loaded, as a KVM host running the bridge
// has, so vsock.Listen binds the host CID (2); with no guest-to-host
// transport loaded a dial to the host CID stays on the loopback: the
// agent's dialer reaches a listener in the same kernel on the port it
// would use in a VM. ListenVsock(cid) needs peer CID
// cid >= 3, so here it can only refuse, which is what the refusal tests
// use; accepting a real guest CID is what the nested guest of
// scripts/vmtest checks (TestNestedVsock* in internal/agent).

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"
)

// RealVsockEnv is set to 1 by scripts/vmtest in a guest with a real AF_VSOCK
// stack (vsock_loopback loaded).
const realVsockEnv = "TPMMUX_VSOCK_REAL"

// requireRealVsock skips t unless it runs on a real AF_VSOCK stack.
func requireRealVsock(t *testing.T) {
	t.Helper()
	if os.Getenv(realVsockEnv) != "1" {
		t.Skipf("needs a real AF_VSOCK stack (vsock_loopback), which this kernel lacks: scripts/vmtest/run.sh runs this test in a QEMU guest that has one (it sets %s=1)", realVsockEnv)
	}
}

// loopbackListener listens where the bridge listens for the VM with guest
// CID cid (port VsockPort(cid)) and checks peer CIDs as ListenVsock does,
// but expects vsock_loopback's peer CID 1.
func loopbackListener(t *testing.T, cid uint32) *CIDListener {
	t.Helper()
	port, err := VsockPort(cid)
	if err != nil {
		t.Fatal(err)
	}
	l, err := vsock.Listen(port, nil)
	if err != nil {
		t.Fatalf("listen vsock port %d: %v (is vsock_loopback loaded?)", port, err)
	}
	cl := CheckCID(l, vsock.Local, VsockPeerCID, testLog(t))
	t.Cleanup(func() { cl.Close() })
	return cl
}

// fixedCID is a CID source for dialVsock: the guest CID this test plays.
func fixedCID(cid uint32) func() (uint32, error) {
	return func() (uint32, error) { return cid, nil }
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, nil))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// acceptOne accepts in the background.
func acceptOne(l Listener) <-chan acceptResult {
	ch := make(chan acceptResult, 1)
	go func() {
		c, err := l.Accept()
		ch <- acceptResult{c, err}
	}()
	return ch
}

type acceptResult struct {
	c   net.Conn
	err error
}

func wait[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(30 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// TestRealVsockDialListen carries bytes both ways between the agent's dialer
// and a peer-CID-checked vsock listener on the per-VM port, and checks the
// addresses the kernel reports: the check reads the real peer CID.
func TestRealVsockDialListen(t *testing.T) {
	requireRealVsock(t)
	const cid = 3001
	l := loopbackListener(t, cid)
	acc := acceptOne(l)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := dialVsock(ctx, fixedCID(cid), HostCID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a := wait(t, acc, "accept")
	if a.err != nil {
		t.Fatal(a.err)
	}
	s := a.c
	defer s.Close()

	port, _ := VsockPort(cid)
	if ra, ok := c.RemoteAddr().(*vsock.Addr); !ok || ra.ContextID != HostCID || ra.Port != port {
		t.Fatalf("dialer's remote address %v, want host cid %d port %d", c.RemoteAddr(), HostCID, port)
	}
	if pc, err := VsockPeerCID(s); err != nil || pc != vsock.Local {
		t.Fatalf("peer cid %d (%v), want %d (vsock_loopback)", pc, err, vsock.Local)
	}
	if _, err := VsockPeerCID(&net.UnixConn{}); err == nil {
		t.Fatal("VsockPeerCID of a unix connection succeeded")
	}
	if l.Kind() != KindVsock || l.Resync() || l.Refused() != 0 {
		t.Fatalf("listener kind %s resync %v refused %d", l.Kind(), l.Resync(), l.Refused())
	}

	// 4 MiB each way at once, compared by digest: a reliable stream.
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	want := sha256.Sum256(data)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for _, pair := range [][2]net.Conn{{c, s}, {s, c}} {
		w, r := pair[0], pair[1]
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, err := w.Write(data)
			errs <- err
		}()
		go func() {
			defer wg.Done()
			h := sha256.New()
			_, err := io.CopyN(h, r, int64(len(data)))
			if err == nil && !bytes.Equal(h.Sum(nil), want[:]) {
				err = errors.New("bytes differ")
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestRealVsockPeerCIDRefused connects to ListenVsock(cid) listeners from a
// peer whose CID (1, the loopback) is not the VM's: the kernel accepts the
// connection, the listener closes it before a byte is read or written,
// counts it, and never hands it to the bridge.
func TestRealVsockPeerCIDRefused(t *testing.T) {
	requireRealVsock(t)
	for _, cid := range []uint32{3, 3002, MaxVsockCID} {
		t.Run("", func(t *testing.T) {
			l, err := ListenVsock(cid, testLog(t))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			acc := acceptOne(l)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for i := 1; i <= 2; i++ {
				c, err := dialVsock(ctx, fixedCID(cid), HostCID)
				if err != nil {
					t.Fatal(err)
				}
				// The refused stream ends without data.
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				n, err := c.Read(make([]byte, 1))
				if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
					t.Fatalf("read on a refused connection: %d bytes, %v; want end of stream", n, err)
				}
				c.Close()
				deadline := time.Now().Add(10 * time.Second)
				for l.Refused() != uint64(i) && time.Now().Before(deadline) {
					time.Sleep(5 * time.Millisecond)
				}
				if l.Refused() != uint64(i) {
					t.Fatalf("refused %d, want %d", l.Refused(), i)
				}
			}
			select {
			case a := <-acc:
				t.Fatalf("Accept returned %v, %v for a peer with the wrong CID", a.c, a.err)
			default:
			}
			l.Close()
			if a := wait(t, acc, "Accept after Close"); a.c != nil || a.err == nil {
				t.Fatalf("Accept after Close: %v, %v", a.c, a.err)
			}
		})
	}
}

// TestRealVsockConnRefused dials a per-VM port nobody listens on: the dial
// fails at once (the kernel answers with a reset), and the error names the
// port and what to check.
func TestRealVsockConnRefused(t *testing.T) {
	requireRealVsock(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t0 := time.Now()
	c, err := dialVsock(ctx, fixedCID(3003), HostCID)
	if err == nil {
		c.Close()
		t.Fatal("dial without a listener succeeded")
	}
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial without a listener: %v, want connection reset or refused", err)
	}
	if !strings.Contains(err.Error(), "port 16780219") || !strings.Contains(err.Error(), "is the bridge serving this VM?") {
		t.Fatalf("error %q does not name the port and the hint", err)
	}
	if d := time.Since(t0); d > 10*time.Second {
		t.Fatalf("refused dial took %v", d)
	}
	t.Logf("dial without a listener: %v", err)
}

// TestRealVsockListenerClose closes the listener while a guest is connected:
// the established stream keeps working, Accept returns an error, a new dial
// is reset, and listening again on the same port works at once.
func TestRealVsockListenerClose(t *testing.T) {
	requireRealVsock(t)
	const cid = 3004
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l := loopbackListener(t, cid)
	acc := acceptOne(l)
	c, err := dialVsock(ctx, fixedCID(cid), HostCID)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a := wait(t, acc, "accept")
	if a.err != nil {
		t.Fatal(a.err)
	}
	defer a.c.Close()

	acc = acceptOne(l)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if r := wait(t, acc, "Accept after Close"); r.c != nil || !errors.Is(r.err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, %v; want net.ErrClosed", r.c, r.err)
	}
	if _, err := c.Write([]byte("still there")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	if _, err := io.ReadFull(a.c, buf); err != nil || string(buf) != "still there" {
		t.Fatalf("established stream after the listener closed: %q, %v", buf, err)
	}
	if c2, err := dialVsock(ctx, fixedCID(cid), HostCID); err == nil {
		c2.Close()
		t.Fatal("dial after the listener closed succeeded")
	} else if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial after the listener closed: %v", err)
	}

	l2 := loopbackListener(t, cid)
	acc = acceptOne(l2)
	c3, err := dialVsock(ctx, fixedCID(cid), HostCID)
	if err != nil {
		t.Fatalf("dial after listening again: %v", err)
	}
	defer c3.Close()
	if r := wait(t, acc, "accept on the new listener"); r.err != nil {
		t.Fatal(r.err)
	} else {
		r.c.Close()
	}
}

// TestRealVsockPeerClose is the other end going away: when the bridge closes a
// guest's stream, the guest reads end of stream and its writes fail; when
// the guest closes, the bridge reads end of stream after the bytes that
// were sent.
func TestRealVsockPeerClose(t *testing.T) {
	requireRealVsock(t)
	const cid = 3005
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l := loopbackListener(t, cid)
	pair := func() (guest, bridge net.Conn) {
		t.Helper()
		acc := acceptOne(l)
		c, err := dialVsock(ctx, fixedCID(cid), HostCID)
		if err != nil {
			t.Fatal(err)
		}
		a := wait(t, acc, "accept")
		if a.err != nil {
			t.Fatal(a.err)
		}
		t.Cleanup(func() { c.Close(); a.c.Close() })
		return c, a.c
	}

	t.Run("bridge closes", func(t *testing.T) {
		g, b := pair()
		read := make(chan error, 1)
		go func() {
			_, err := g.Read(make([]byte, 1))
			read <- err
		}()
		time.Sleep(50 * time.Millisecond) // let the read block
		b.Close()
		if err := wait(t, read, "the guest's read"); err != io.EOF {
			t.Fatalf("guest read after the bridge closed: %v, want EOF", err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, err := g.Write([]byte("x"))
			if err != nil {
				if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("guest write after the bridge closed: %v, want EPIPE or ECONNRESET", err)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("guest writes still succeed 10 s after the bridge closed")
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	t.Run("guest closes", func(t *testing.T) {
		g, b := pair()
		msg := bytes.Repeat([]byte("m"), 100000)
		if _, err := g.Write(msg); err != nil {
			t.Fatal(err)
		}
		g.Close()
		got, err := io.ReadAll(b)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("bridge read %d bytes, %v; want the %d sent, then EOF", len(got), err, len(msg))
		}
	})
}
