package vtpm

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// idlePair returns a connected pair of unix stream sockets as
// *net.UnixConn (as QEMU's control and data sockets are).
func idlePair(t *testing.T) (*net.UnixConn, *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]*net.UnixConn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "pair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c.(*net.UnixConn)
		t.Cleanup(func() { c.Close() })
	}
	return cs[0], cs[1]
}

// TestWaitIdle: a channel idle for bufIdle drops its buffers and goes on
// waiting; the bytes (and an SCM_RIGHTS fd) that end the wait are still
// there for the real read; a busy channel keeps its buffers; a
// cancellation ends the wait with ctx.Err().
func TestWaitIdle(t *testing.T) {
	ctx := context.Background()
	a, b := idlePair(t)

	// Busy: bytes already there, the buffers stay.
	buf, oob := make([]byte, 16), make([]byte, 64)
	a.Write([]byte("x"))
	if err := waitIdle(ctx, b, &buf, &oob); err != nil || buf == nil || oob == nil {
		t.Fatalf("busy channel: err %v, buffers kept %v %v", err, buf != nil, oob != nil)
	}
	if n, _ := b.Read(buf); n != 1 || buf[0] != 'x' {
		t.Fatalf("the byte that ended the wait was consumed: read %d", n)
	}

	// Idle past bufIdle: the buffers go, the wait goes on, and a message
	// with an fd is read whole afterwards.
	done := make(chan error, 1)
	go func() { done <- waitIdle(ctx, b, &buf, &oob) }()
	time.Sleep(bufIdle + 300*time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("wait ended with nothing sent: %v", err)
	default:
	}
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	defer unix.Close(fds[0])
	if _, _, err := a.WriteMsgUnix([]byte("fd!"), unix.UnixRights(fds[1]), nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[1])
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if buf != nil || oob != nil {
		t.Error("buffers kept over an idle bufIdle")
	}
	p, o := make([]byte, 16), make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := b.ReadMsgUnix(p, o)
	if err != nil || string(p[:n]) != "fd!" || len(receivedFDs(o[:oobn])) != 1 {
		t.Fatalf("after the wait: %q, %d fds, %v", p[:n], len(receivedFDs(o[:oobn])), err)
	}

	// Cancellation, by the servers' convention (a past read deadline).
	cctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(cctx, func() { b.SetReadDeadline(time.Now()) })
	defer stop()
	buf = make([]byte, 16)
	go func() { done <- waitIdle(cctx, b, &buf) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != context.Canceled {
			t.Errorf("cancelled wait: %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancelled wait did not end")
	}

	// The peer's end is readable too (the read then sees EOF).
	a.Close()
	if err := waitIdle(ctx, b); err != nil {
		t.Errorf("wait at the peer's close: %v", err)
	}
}

type nopJournal struct{}

func (nopJournal) Append(context.Context, vpcr.Event) error { return nil }

// TestDataAcrossIdle: a guest's commands are answered alike before and
// after its data channel went idle (and gave its buffer back), including
// two commands written at once after the idle time; with a Parker (the
// idle channel waits in it, with no goroutine) and without.
func TestDataAcrossIdle(t *testing.T) {
	for _, park := range []bool{false, true} {
		name := "goroutine"
		if park {
			name = "parked"
		}
		t.Run(name, func(t *testing.T) { testDataAcrossIdle(t, park) })
	}
}

func testDataAcrossIdle(t *testing.T, park bool) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var p *Parker
	if park {
		var err error
		if p, err = NewParker(); err != nil {
			t.Fatal(err)
		}
		defer p.Close()
	}
	v, err := New(Config{Journal: nopJournal{}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Parker: p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	guest, bridge := idlePair(t)
	go v.ServeData(ctx, bridge)
	v.Init(ctx)
	rc := func(cmd []byte) uint32 {
		t.Helper()
		hdr := make([]byte, 10)
		guest.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(guest, hdr); err != nil {
			t.Fatalf("response to %x: %v", cmd[6:10], err)
		}
		rest := make([]byte, binary.BigEndian.Uint32(hdr[2:6])-10)
		io.ReadFull(guest, rest)
		return binary.BigEndian.Uint32(hdr[6:10])
	}
	startup := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}
	selfTest := []byte{0x80, 0x01, 0, 0, 0, 11, 0, 0, 0x01, 0x43, 1}
	guest.Write(startup)
	if r := rc(startup); r != 0 {
		t.Fatalf("Startup: %#x", r)
	}
	time.Sleep(bufIdle + 300*time.Millisecond)
	if park && p.Parked() != 1 {
		t.Errorf("%d channels parked after the idle time, want 1", p.Parked())
	}
	guest.Write(append(append([]byte(nil), selfTest...), selfTest...))
	for i := range 2 {
		if r := rc(selfTest); r != 0 {
			t.Fatalf("SelfTest %d after the idle time: %#x", i, r)
		}
	}
	guest.Write(startup)
	if r := rc(startup); r != rcInitialize {
		t.Errorf("second Startup: %#x, want TPM_RC_INITIALIZE", r)
	}
}
