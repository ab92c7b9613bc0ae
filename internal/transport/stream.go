package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// SessionConn is one session's view of a stream that outlives it: what
// ServeSessions hands each session. Close ends the session, not the
// stream; read deadlines are ignored, write deadlines apply.
type SessionConn interface {
	io.ReadWriteCloser
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// sessionPause is the wait between one session's end and the next one's
// start on the same stream, so a stream that fails at once does not spin.
const sessionPause = 100 * time.Millisecond

// ServeSessions serves successive sessions over one connection c until c
// fails or ctx ends. It is for virtio-serial: QEMU holds the host end for
// the VM's life (the guest agent opening and closing its port does not end
// it), so a guest session that ends (agent restarted, a protocol error,
// replaced by a session on another transport) must not close it: the next
// session runs on the same stream, and the wire reader resynchronizes to
// its Hello. serve runs one session and returns when it ends; it may close
// the view it gets. ServeSessions does not close c.
func ServeSessions(ctx context.Context, c net.Conn, serve func(ctx context.Context, s SessionConn)) {
	s := &stream{c: c}
	for ctx.Err() == nil {
		serve(ctx, s.next())
		if s.isDead() {
			return
		}
		select {
		case <-time.After(sessionPause):
		case <-ctx.Done():
			return
		}
	}
}

// stream hands one underlying connection to successive sessions. Each
// session gets a view whose Close ends only that session (it unblocks the
// view's pending reads and writes with a past deadline) and whose read
// deadlines are ignored (an idle virtio-serial stream is normal: the guest
// agent may not run yet).
type stream struct {
	c    net.Conn
	mu   sync.Mutex
	gen  int
	dead bool
}

func (s *stream) next() *streamView {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gen++
	s.c.SetDeadline(time.Time{})
	return &streamView{s: s, gen: s.gen}
}

func (s *stream) isDead() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dead
}

// failed marks the stream dead after an error that is not a deadline.
func (s *stream) failed(err error) {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return
	}
	s.mu.Lock()
	s.dead = true
	s.mu.Unlock()
}

type streamView struct {
	s      *stream
	gen    int
	mu     sync.Mutex
	closed bool
}

var errViewClosed = fmt.Errorf("session ended: %w", net.ErrClosed)

func (v *streamView) isClosed() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.closed
}

func (v *streamView) Read(p []byte) (int, error) { return v.do(v.s.c.Read, p) }

func (v *streamView) Write(p []byte) (int, error) { return v.do(v.s.c.Write, p) }

// do runs a read or write of the stream for this view's session: once the
// view is closed it fails with errViewClosed (also when Close interrupted
// it), and any other failure but a deadline marks the stream dead.
func (v *streamView) do(op func([]byte) (int, error), p []byte) (int, error) {
	if v.isClosed() {
		return 0, errViewClosed
	}
	n, err := op(p)
	if err != nil {
		if v.isClosed() {
			return n, errViewClosed
		}
		v.s.failed(err)
	}
	return n, err
}

// Close ends this view's session without closing the stream.
func (v *streamView) Close() error {
	v.mu.Lock()
	already := v.closed
	v.closed = true
	v.mu.Unlock()
	if already {
		return nil
	}
	v.s.mu.Lock()
	if v.s.gen == v.gen {
		v.s.c.SetDeadline(time.Unix(1, 0))
	}
	v.s.mu.Unlock()
	return nil
}

// SetReadDeadline is ignored: see stream.
func (v *streamView) SetReadDeadline(time.Time) error { return nil }

// SetWriteDeadline bounds writes to a guest that does not read.
func (v *streamView) SetWriteDeadline(t time.Time) error {
	if v.isClosed() {
		return nil
	}
	return v.s.c.SetWriteDeadline(t)
}
