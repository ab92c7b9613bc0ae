package vtpm_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// idleWait is longer than a channel's idle time (bufIdle, 1 s) plus the
// time its loop takes to notice.
const idleWait = 1600 * time.Millisecond

// newParker returns a Parker closed at the test's end.
func newParker(t testing.TB) *vtpm.Parker {
	t.Helper()
	p, err := vtpm.NewParker()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// parkedVM is one vTPM served by StartListener, connected as QEMU connects.
type parkedVM struct {
	v    *vtpm.VTPM
	path string        // the control socket
	ctrl *net.UnixConn // QEMU's ends
	data net.Conn
	done chan error // StartListener's result
}

// startParkedVM serves a vTPM on a listener with StartListener and
// connects to it as QEMU does (SET_DATAFD, INIT, Startup).
func startParkedVM(t *testing.T, ctx context.Context, p *vtpm.Parker, dir string, i int) *parkedVM {
	t.Helper()
	v, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}, Logger: quietLog(), Parker: p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "v"+string(rune('a'+i%26))+string(rune('a'+i/26))+".sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	vm := &parkedVM{v: v, path: path, done: make(chan error, 1)}
	v.StartListener(ctx, l, func(err error) { vm.done <- err })
	if vm.ctrl, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.ctrl.Close() })
	vm.data = setDataFD(t, vm.ctrl)
	t.Cleanup(func() { vm.data.Close() })
	ctrlCall(t, vm.ctrl, 2, []byte{0, 0, 0, 0}, nil, 4)
	if rc := respRC(t, vm.data, startupClear); rc != 0 {
		t.Fatalf("Startup: %#x", rc)
	}
	return vm
}

var startupClear = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}

// setDataFD passes a new data socket by CMD_SET_DATAFD and returns QEMU's
// end of it.
func setDataFD(t *testing.T, ctrl *net.UnixConn) net.Conn {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r := ctrlCall(t, ctrl, 16, nil, []int{fds[1]}, 4); r[3] != 0 {
		t.Fatalf("SET_DATAFD: %x", r)
	}
	unix.Close(fds[1])
	f := os.NewFile(uintptr(fds[0]), "qemu-data")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestParkedVTPMs: with a Parker, idle vTPMs (waiting for QEMU's
// connection, or connected and idle) hold no goroutine: their sockets wait
// in the Parker. A parked data channel answers its next command (the
// guest-visible latency of the first command after the idle time is
// logged and bounded), a parked control channel takes a message with an
// SCM_RIGHTS fd, and both end as without the Parker: the control peer's
// close ends the data channel too, and a cancellation leaves both open
// for a handover.
func TestParkedVTPMs(t *testing.T) {
	const n = 50
	p := newParker(t)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g0 := runtime.NumGoroutine()
	vms := make([]*parkedVM, n)
	for i := range vms {
		vms[i] = startParkedVM(t, ctx, p, dir, i)
	}
	time.Sleep(idleWait)
	if got := p.Parked(); got != 2*n {
		t.Errorf("%d sockets parked, want %d (control and data of %d vTPMs)", got, 2*n, n)
	}
	// Without the Parker each vTPM holds two goroutines (control, data).
	if g := runtime.NumGoroutine() - g0; g > n/5 {
		t.Errorf("%d idle vTPMs hold %d goroutines, want none each", n, g)
	}

	// The first command after the idle time, and a busy one after it.
	var first, busy []time.Duration
	for i, vm := range vms {
		t0 := time.Now()
		if rc := respRC(t, vm.data, twoBankExtend(i)); rc != 0 {
			t.Fatalf("extend after the idle time: %#x", rc)
		}
		first = append(first, time.Since(t0))
		t0 = time.Now()
		if rc := respRC(t, vm.data, twoBankExtend(n+i)); rc != 0 {
			t.Fatalf("extend: %#x", rc)
		}
		busy = append(busy, time.Since(t0))
	}
	slices.Sort(first)
	slices.Sort(busy)
	t.Logf("extend latency, median: first after the idle time %v, busy %v", first[n/2], busy[n/2])
	if first[n/2] > busy[n/2]+time.Millisecond {
		t.Errorf("the first command after the idle time takes %v, a busy one %v", first[n/2], busy[n/2])
	}

	// A control command after the idle time (still parked: data was
	// busy, control not), with an fd: a second data socket is refused
	// (the first is in use), and the fd is not leaked into the vTPM.
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if r := ctrlCall(t, vms[0].ctrl, 16, nil, []int{fds[1]}, 4); r[3] != 0x1F {
		t.Errorf("second SET_DATAFD on a parked control channel: %x, want PTM_IO_ERROR", r)
	}
	unix.Close(fds[1])
	// The vTPM closed its copy: the peer sees the end.
	fds0 := os.NewFile(uintptr(fds[0]), "refused")
	fds0.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := fds0.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("the refused data socket: %v, want EOF (closed by the vTPM)", err)
	}
	fds0.Close()

	// The control peer hangs up while both channels are parked: the data
	// channel ends with it, the listener accepts the next QEMU, whose
	// control channel parks at once (it has no buffers yet) and then
	// takes its data socket by SCM_RIGHTS.
	time.Sleep(idleWait)
	vm := vms[1]
	vm.ctrl.Close()
	vm.data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := vm.data.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("data channel after the control peer's close: %v, want EOF", err)
	}
	select {
	case err := <-vm.done:
		t.Fatalf("the listener ended with its connection: %v", err)
	default:
	}
	var err error
	if vm.ctrl, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: vm.path, Net: "unix"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.ctrl.Close() })
	time.Sleep(idleWait)
	if got := p.Parked(); got < 2*n-1 {
		t.Errorf("%d sockets parked, want at least %d", got, 2*n-1)
	}
	vm.data = setDataFD(t, vm.ctrl)
	t.Cleanup(func() { vm.data.Close() })
	ctrlCall(t, vm.ctrl, 2, []byte{0, 0, 0, 0}, nil, 4)
	if rc := respRC(t, vm.data, startupClear); rc != 0 {
		t.Fatalf("Startup on the second connection: %#x", rc)
	}

	// Cancellation while parked: the servers end with ctx.Err() and leave
	// the connections open.
	time.Sleep(idleWait)
	cancel()
	for i, vm := range vms {
		select {
		case err := <-vm.done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("vTPM %d after cancel: %v", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("vTPM %d did not end on cancel", i)
		}
		if vm.v.ControlConn() == nil || vm.v.DataConn() == nil {
			t.Errorf("vTPM %d dropped its connections on cancel (no handover possible)", i)
		}
	}
	if got := p.Parked(); got != 0 {
		t.Errorf("%d sockets still parked after the cancel", got)
	}
}
