package vtpm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// fdHandover turns a conn into a new one on a dup of its fd and closes the
// old one: what passing the fd through systemd's FDSTORE or a re-exec does.
func fdHandover(t *testing.T, c net.Conn) net.Conn {
	t.Helper()
	f, err := c.(interface{ File() (*os.File, error) }).File()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	defer f.Close()
	n, err := net.FileConn(f)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestHandover: a bridge process stops serving (ctx ends) without closing
// QEMU's control and data connections; a new one restores the vTPM from
// the journal and serves the same connections (handed over as fds). The
// guest's TPM keeps its PCRs, a command sent while nobody served waits
// and is answered by the new process, and nothing is refused. With a
// Parker the channels are parked (idle) when the old process lets go and
// when the new one gets its first command.
func TestHandover(t *testing.T) {
	for _, park := range []bool{false, true} {
		name := "goroutine"
		if park {
			name = "parked"
		}
		t.Run(name, func(t *testing.T) { testHandover(t, park) })
	}
}

func testHandover(t *testing.T, park bool) {
	var p *vtpm.Parker
	idle := func(want int) {}
	if park {
		p = newParker(t)
		idle = func(want int) {
			t.Helper()
			time.Sleep(idleWait)
			if got := p.Parked(); got != want {
				t.Fatalf("%d channels parked, want %d", got, want)
			}
		}
	}
	j := &vtpmtest.Journal{}
	v1, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Parker: p}, nil)
	if err != nil {
		t.Fatal(err)
	}
	qemuCtrl, bridgeCtrl := unixPair(t)
	ctx1, stop1 := context.WithCancel(context.Background())
	served1 := make(chan error, 1)
	go func() { served1 <- v1.ServeControl(ctx1, bridgeCtrl) }()

	// QEMU: SET_DATAFD, INIT; the firmware: Startup; the kernel: extends.
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	ctrlCall(t, qemuCtrl, 16, nil, []int{fds[1]}, 4)
	unix.Close(fds[1])
	ctrlCall(t, qemuCtrl, 2, []byte{0, 0, 0, 0}, nil, 4)
	f := os.NewFile(uintptr(fds[0]), "qemu-data")
	qemuData, _ := net.FileConn(f)
	f.Close()
	defer qemuData.Close()
	if rc := respRC(t, qemuData, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}); rc != 0 {
		t.Fatal(rc)
	}
	d := sha256.Sum256([]byte("before"))
	if rc := respRC(t, qemuData, rawExtendWithSession(0x40000009, 10, d[:])); rc != 0 {
		t.Fatal(rc)
	}
	bridgeData := v1.DataConn()
	if bridgeData == nil || v1.ControlConn() != bridgeCtrl {
		t.Fatal("the vTPM does not report its connections")
	}

	// The old process lets go.
	idle(2)
	stop1()
	if err := <-served1; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeControl after cancel: %v", err)
	}
	if v1.ControlConn() != bridgeCtrl || v1.DataConn() != bridgeData {
		t.Fatal("after a cancel the vTPM no longer reports the connections to hand over")
	}
	// The guest sends a command while no process serves: it waits.
	d2 := sha256.Sum256([]byte("during the handover"))
	if _, err := qemuData.Write(rawExtendWithSession(0x40000009, 10, d2[:])); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	ctrl2, data2 := fdHandover(t, bridgeCtrl), fdHandover(t, bridgeData)

	// The new process: restore from the journal, serve the kept fds.
	v2, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Parker: p}, j.Events())
	if err != nil {
		t.Fatal(err)
	}
	ctx2, stop2 := context.WithCancel(context.Background())
	defer stop2()
	go v2.ServeControl(ctx2, ctrl2.(*net.UnixConn))
	go v2.ServeData(ctx2, data2)
	if rc := respRC(t, qemuData, nil); rc != 0 {
		t.Fatalf("the command sent during the handover: rc %#x", rc)
	}
	want := extendOf(extendOf(make([]byte, 32), d[:]), d2[:])
	if got := v2.PCRs().Read(vpcr.SHA256, 10); !bytes.Equal(got, want) {
		t.Fatalf("PCR 10 after the handover %x, want %x", got, want)
	}
	// Control commands reach the new process too (parked by now).
	idle(2)
	if est := ctrlCall(t, qemuCtrl, 4, nil, nil, 8); est[3] != 0 {
		t.Fatalf("GET_TPMESTABLISHED after handover: %x", est)
	}
	replayed, err := vpcr.Replay(vtpm.DefaultBanks(), j.Events())
	if err != nil || !replayed.Equal(v2.PCRs()) {
		t.Fatalf("replay after handover: %v", err)
	}
}
