package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// TestServeSessions drives the virtio-serial stream over a real unix
// socket pair: a session blocked in Read ends when its view is closed, the
// stream survives it and serves the next session (which sees the bytes the
// peer sends next, read deadlines notwithstanding), and the stream ends
// only when the peer hangs up.
func TestServeSessions(t *testing.T) {
	srv, peer := unixPair(t)
	type result struct {
		got string
		err error
	}
	results := make(chan result, 8)
	sessions := 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeSessions(context.Background(), srv, func(ctx context.Context, s SessionConn) {
			sessions++
			n := sessions
			if n == 1 {
				// The first session blocks in Read until its view is closed
				// (what the bridge does when another transport replaces it).
				go func() { time.Sleep(50 * time.Millisecond); s.Close() }()
			}
			s.SetReadDeadline(time.Unix(1, 0)) // ignored: an idle stream is normal
			buf := make([]byte, 1)
			_, err := io.ReadFull(s, buf)
			results <- result{string(buf), err}
			s.Close()
		})
	}()
	r := <-results
	if !errors.Is(r.err, net.ErrClosed) {
		t.Fatalf("session 1 read = %q, %v; want the view's closed error", r.got, r.err)
	}
	if _, err := peer.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	if r := <-results; r.err != nil || r.got != "b" {
		t.Fatalf("session 2 read = %q, %v; want \"b\" on the same stream", r.got, r.err)
	}
	peer.Close()
	if r := <-results; !errors.Is(r.err, io.EOF) {
		t.Fatalf("session 3 read = %q, %v; want EOF once the peer hung up", r.got, r.err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeSessions kept serving a stream whose peer hung up")
	}
	if sessions != 3 {
		t.Fatalf("%d sessions, want 3", sessions)
	}
}

// TestServeSessionsContext checks that ServeSessions returns when its
// context ends between sessions.
func TestServeSessionsContext(t *testing.T) {
	srv, _ := unixPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ServeSessions(ctx, srv, func(ctx context.Context, s SessionConn) {
			cancel()
			s.Close()
		})
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeSessions did not return after its context ended")
	}
}

func unixPair(t *testing.T) (srv, peer net.Conn) {
	t.Helper()
	path := t.TempDir() + "/s.sock"
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	peer, err = net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv, err = l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close(); peer.Close() })
	return srv, peer
}
