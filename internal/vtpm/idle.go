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

// waitIdle waits until c has bytes to read (or its end, or an error),
// without reading them. While *bufs are held it waits at most bufIdle and
// then drops them (sets each to nil) and waits on. It honors ctx by the
// caller's convention: a cancellation sets a past read deadline, and it
// returns ctx.Err() instead of the deadline's error.
func waitIdle(ctx context.Context, c net.Conn, bufs ...*[]byte) error {
	if len(bufs) > 0 && *bufs[0] != nil {
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
	}
	c.SetReadDeadline(time.Time{})
	if ctx.Err() != nil {
		return ctx.Err()
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
