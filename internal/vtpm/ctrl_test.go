package vtpm_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// ctrlRig is a vTPM served on a control socket.
type ctrlRig struct {
	v    *vtpm.VTPM
	j    *vtpmtest.Journal
	path string
}

func newCtrlRig(t *testing.T) *ctrlRig {
	t.Helper()
	j := &vtpmtest.Journal{}
	v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "ctrl.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.ServeListener(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done; l.Close() })
	return &ctrlRig{v: v, j: j, path: path}
}

// TestSwtpmIoctl drives the control channel with swtpm's own client,
// swtpm_ioctl (one connection per call, as it works).
func TestSwtpmIoctl(t *testing.T) {
	if _, err := exec.LookPath("swtpm_ioctl"); err != nil {
		t.Skip("swtpm_ioctl not installed (Debian: swtpm-tools)")
	}
	r := newCtrlRig(t)
	run := func(args ...string) (string, error) {
		out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", r.path}, args...)...).CombinedOutput()
		return string(out), err
	}
	tests := []struct {
		args    []string
		wantOut string
		wantErr bool
	}{
		{args: []string{"-c"}, wantOut: "ptm capability is 0x"},
		{args: []string{"-i"}},
		{args: []string{"-e"}, wantOut: "tpmEstablished is 0"},
		{args: []string{"-l", "3"}},
		{args: []string{"-l", "7"}, wantErr: true},
		{args: []string{"-r", "3"}},
		{args: []string{"-r", "0"}, wantErr: true},
		{args: []string{"-b", "3968"}, wantOut: "TPM buffersize: 3968"},
		{args: []string{"-b", "100000"}, wantOut: "TPM buffersize: 4096"},
		{args: []string{"-g"}, wantOut: "ptm configuration flags: 0x0"},
		{args: []string{"-v"}},
		{args: []string{"-C"}},
		{args: []string{"--save", "volatile", filepath.Join(t.TempDir(), "blob")}},
		{args: []string{"--load", "volatile", "/dev/null"}, wantErr: true}, // not migrating in
		{args: []string{"-h", "data"}, wantErr: true},
		{args: []string{"--stop"}},
		{args: []string{"-s"}},
	}
	for _, tc := range tests {
		out, err := run(tc.args...)
		if (err != nil) != tc.wantErr {
			t.Errorf("swtpm_ioctl %v: err %v, want error %v; output %q", tc.args, err, tc.wantErr, out)
		}
		if !strings.Contains(out, tc.wantOut) {
			t.Errorf("swtpm_ioctl %v: output %q, want %q", tc.args, out, tc.wantOut)
		}
	}
	if got := r.v.Locality(); got != 3 {
		t.Errorf("locality %d after -l 3 and a refused -l 7", got)
	}
	if ev := r.j.Events(); len(ev) != 1 || ev[0].Kind != vpcr.KindInit {
		t.Errorf("journal %v, want the one INIT", ev)
	}
}

// ctrlCall sends a control command (with optional fds) and reads n bytes.
func ctrlCall(t *testing.T, c *net.UnixConn, code uint32, body []byte, fds []int, n int) []byte {
	t.Helper()
	msg := append(binary.BigEndian.AppendUint32(nil, code), body...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(msg, oob, nil); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp := make([]byte, n)
	if _, err := io.ReadFull(c, resp); err != nil {
		t.Fatalf("control command %d: %v", code, err)
	}
	return resp
}

// TestControlChannelAsQEMU speaks the control channel as QEMU 7.2 does
// (padded request structures, the data socket by SCM_RIGHTS) and checks
// each answer's exact size and result, and the refusals.
func TestControlChannelAsQEMU(t *testing.T) {
	r := newCtrlRig(t)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: r.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res := func(b []byte) uint32 { return binary.BigEndian.Uint32(b) }

	// SET_DATAFD without an fd: bad parameter.
	if rc := res(ctrlCall(t, c, 16, nil, nil, 4)); rc != 3 {
		t.Fatalf("SET_DATAFD without fd: %#x", rc)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	data := os.NewFile(uintptr(fds[0]), "data")
	defer data.Close()
	if rc := res(ctrlCall(t, c, 16, nil, []int{fds[1]}, 4)); rc != 0 {
		t.Fatalf("SET_DATAFD: %#x", rc)
	}
	unix.Close(fds[1])
	// A second data socket is refused (TPM_IOERROR), as swtpm does.
	fds2, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if rc := res(ctrlCall(t, c, 16, nil, []int{fds2[1]}, 4)); rc != 0x1F {
		t.Fatalf("second SET_DATAFD: %#x", rc)
	}
	unix.Close(fds2[0])
	unix.Close(fds2[1])

	caps := binary.BigEndian.Uint64(ctrlCall(t, c, 1, nil, nil, 8))
	const qemuMin = 1 | 2 | 4 | 8 | 0x80 | 0x1000 | 0x400 | 0x2000
	if caps&qemuMin != qemuMin || caps&(0x100|0x200) != 0x300 {
		t.Fatalf("caps %#x: want QEMU's TPM 2.0 minimum and the state blobs (migration)", caps)
	}
	// QEMU's probe before INIT: a ReadClock gets TPM_RC_FAILURE, 2.0 tag.
	dc, _ := net.FileConn(data)
	defer dc.Close()
	resp := roundTrip(t, dc, []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x81})
	if resp[0] != 0x80 || resp[1] != 0x01 || binary.BigEndian.Uint32(resp[6:]) != 0x101 {
		t.Fatalf("probe answer %x", resp)
	}
	// STOP, SET_BUFFERSIZE(0) query: 16-byte answer.
	if rc := res(ctrlCall(t, c, 14, nil, nil, 4)); rc != 0 {
		t.Fatal(rc)
	}
	sb := ctrlCall(t, c, 17, []byte{0, 0, 0, 0}, nil, 16)
	if res(sb) != 0 || binary.BigEndian.Uint32(sb[4:]) != 4096 || binary.BigEndian.Uint32(sb[8:]) != 1024 || binary.BigEndian.Uint32(sb[12:]) != 4096 {
		t.Fatalf("SET_BUFFERSIZE(0): %x", sb)
	}
	sb = ctrlCall(t, c, 17, binary.BigEndian.AppendUint32(nil, 3968), nil, 16)
	if binary.BigEndian.Uint32(sb[4:]) != 3968 {
		t.Fatalf("SET_BUFFERSIZE(3968): %x", sb)
	}
	// INIT (4-byte flags), GET_TPMESTABLISHED (8-byte answer), SET_LOCALITY
	// padded to 4 bytes as QEMU sends sizeof(ptm_loc).
	if rc := res(ctrlCall(t, c, 2, []byte{0, 0, 0, 0}, nil, 4)); rc != 0 {
		t.Fatal(rc)
	}
	if est := ctrlCall(t, c, 4, nil, nil, 8); res(est) != 0 || est[4] != 0 {
		t.Fatalf("GET_TPMESTABLISHED %x", est)
	}
	if rc := res(ctrlCall(t, c, 5, []byte{0, 0, 0, 0}, nil, 4)); rc != 0 {
		t.Fatal(rc)
	}
	if rc := res(ctrlCall(t, c, 5, []byte{5, 0, 0, 0}, nil, 4)); rc != 0x3D {
		t.Fatalf("SET_LOCALITY 5: %#x", rc)
	}
	// GET_STATEBLOB: QEMU reads a 16-byte header even on error.
	gs := ctrlCall(t, c, 12, make([]byte, 12), nil, 16)
	if res(gs) == 0 || binary.BigEndian.Uint32(gs[8:]) != 0 || binary.BigEndian.Uint32(gs[12:]) != 0 {
		t.Fatalf("GET_STATEBLOB: %x", gs)
	}
	// SET_STATEBLOB: the header, then the blob in a second write, then the
	// answer; the blob is drained so the channel stays in step.
	hdr := append(make([]byte, 8), binary.BigEndian.AppendUint32(nil, 5000)...)
	msg := append(binary.BigEndian.AppendUint32(nil, 13), hdr...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	ans := make([]byte, 4)
	if _, err := io.ReadFull(c, ans); err != nil || res(ans) == 0 {
		t.Fatalf("SET_STATEBLOB: %x %v", ans, err)
	}
	// Unknown command: TPM_BAD_ORDINAL, and the channel still works.
	if rc := res(ctrlCall(t, c, 99, nil, nil, 4)); rc != 10 {
		t.Fatalf("unknown command: %#x", rc)
	}
	// The data channel runs: Startup after INIT.
	resp = roundTrip(t, dc, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0})
	if rc := binary.BigEndian.Uint32(resp[6:]); rc != 0 {
		t.Fatalf("Startup: %#x", rc)
	}
	// SHUTDOWN: success, then TPM commands fail.
	if rc := res(ctrlCall(t, c, 3, nil, nil, 4)); rc != 0 {
		t.Fatal(rc)
	}
	resp = roundTrip(t, dc, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 8})
	if rc := binary.BigEndian.Uint32(resp[6:]); rc != 0x101 {
		t.Fatalf("GetRandom after SHUTDOWN: %#x", rc)
	}
	// Closing the control connection ends the data channel too.
	c.Close()
	dc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := dc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("data channel after the control peer left: %v, want EOF", err)
	}
}

// TestNewQEMURun: a VM whose journal says its TPM was running (an earlier
// QEMU run) starts again: the new QEMU's data socket finds the TPM off
// until its CMD_INIT, as with a fresh swtpm, and its firmware's Startup
// is the reboot record.
func TestNewQEMURun(t *testing.T) {
	old := newRig(t, nil, nil)
	old.powerOn(t)
	past := old.j.Events()

	j := &vtpmtest.Journal{}
	v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog()}, past)
	if err != nil {
		t.Fatal(err)
	}
	qemuCtrl, bridgeCtrl := unixPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go v.ServeControl(ctx, bridgeCtrl)
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	ctrlCall(t, qemuCtrl, 16, nil, []int{fds[1]}, 4)
	unix.Close(fds[1])
	f := os.NewFile(uintptr(fds[0]), "data")
	dc, _ := net.FileConn(f)
	f.Close()
	defer dc.Close()
	if rc := respRC(t, dc, []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x81}); rc != 0x101 {
		t.Fatalf("probe before INIT on a restored vTPM: rc %#x, want TPM_RC_FAILURE", rc)
	}
	ctrlCall(t, qemuCtrl, 2, []byte{0, 0, 0, 0}, nil, 4)
	if rc := respRC(t, dc, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}); rc != 0 {
		t.Fatalf("Startup of the new run: %#x", rc)
	}
	if ev := j.Events(); len(ev) != 2 || ev[0].Kind != vpcr.KindInit || ev[1].Kind != vpcr.KindStartup || ev[0].Seq != uint64(len(past))+1 {
		t.Fatalf("new run's records %v", ev)
	}
}
