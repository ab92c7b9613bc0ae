package vtpm

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// bufIdle is how long a channel's read buffers outlive its last command:
// a VM whose guest sends no TPM command for that long gives them back, so
// the many idle VMs of a host hold no buffers (docs/performance.md, P8),
// while a busy guest's commands allocate none.
const bufIdle = time.Second

// errIdle is waitBusy's report that the channel was idle for bufIdle and
// its buffers are dropped.
var errIdle = errors.New("vtpm: channel idle")

// waitIdle waits until c has bytes to read (or its end, or an error),
// without reading them. While *bufs are held it waits at most bufIdle and
// then drops them (sets each to nil) and waits on. It honors ctx by the
// caller's convention: a cancellation sets a past read deadline, and it
// returns ctx.Err() instead of the deadline's error.
func waitIdle(ctx context.Context, c net.Conn, bufs ...*[]byte) error {
	if err := waitBusy(ctx, c, bufs...); err != errIdle {
		return err
	}
	return waitReady(ctx, c, true)
}

// waitBusy is waitIdle's first part: while *bufs are held it waits at
// most bufIdle for c to be readable (nil), and then drops them and returns
// errIdle. Without buffers it returns errIdle at once. A server with a
// Parker parks the channel on errIdle instead of waiting on.
func waitBusy(ctx context.Context, c net.Conn, bufs ...*[]byte) error {
	if len(bufs) == 0 || *bufs[0] == nil {
		return errIdle
	}
	c.SetReadDeadline(time.Now().Add(bufIdle))
	if ctx.Err() != nil {
		return ctx.Err()
	}
	err := waitReadable(c)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err == nil {
		// Ready: the caller reads without a deadline, as after the
		// wait below.
		c.SetReadDeadline(time.Time{})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return nil
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	for _, b := range bufs {
		*b = nil
	}
	return errIdle
}

// waitReady clears c's read deadline and, if wait, waits until c is
// readable (without one); a cancellation of ctx (whose AfterFunc sets a
// past deadline) returns ctx.Err(). A channel resumed by its Parker is
// readable already: it only clears the deadline its idle wait left.
func waitReady(ctx context.Context, c net.Conn, wait bool) error {
	c.SetReadDeadline(time.Time{})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !wait {
		return nil
	}
	err := waitReadable(c)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// waitReadable waits, within c's read deadline, until a read from c would
// not block, by peeking (MSG_PEEK) at a byte: nothing is consumed, an
// SCM_RIGHTS message stays whole for the real read. A connection that is
// not a socket file is reported ready at once (the caller's read then
// blocks as before).
func waitReadable(c net.Conn) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return err != unix.EAGAIN && err != unix.EINTR
	})
}
