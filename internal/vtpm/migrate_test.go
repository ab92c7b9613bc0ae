package vtpm_test

import (
	"bytes"
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

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// serveCtrl serves v's control channel on a fresh socket and returns its path.
func serveCtrl(t *testing.T, v *vtpm.VTPM) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctrl.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.ServeListener(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done; l.Close() })
	return path
}

// qemuCtrl is a control connection kept open, as QEMU keeps it.
func qemuCtrl(t *testing.T, sock string) *net.UnixConn {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	// Not closed by a cleanup: the test's end cancels the server first
	// (as a bridge handing over would), and a QEMU that closes its control
	// connection takes the data channel down with it.
	return c
}

// getBlob is QEMU's tpm_emulator_get_state_blob.
func getBlob(t *testing.T, c *net.UnixConn, typ uint32) []byte {
	t.Helper()
	hdr := ctrlCall(t, c, 12, be32s(1, typ, 0), nil, 16) // PTM_STATE_FLAG_DECRYPTED
	if rc := binary.BigEndian.Uint32(hdr); rc != 0 {
		t.Fatalf("GET_STATEBLOB %d: %#x", typ, rc)
	}
	tot, n := binary.BigEndian.Uint32(hdr[8:]), binary.BigEndian.Uint32(hdr[12:])
	if tot != n {
		t.Fatalf("GET_STATEBLOB %d: totlength %d, length %d", typ, tot, n)
	}
	blob := make([]byte, n)
	if _, err := io.ReadFull(c, blob); err != nil {
		t.Fatal(err)
	}
	return blob
}

// setBlob is QEMU's tpm_emulator_set_state_blob: the header, then the
// body in a second write, then the result. It skips empty blobs, as QEMU does.
func setBlob(t *testing.T, c *net.UnixConn, typ uint32, blob []byte) uint32 {
	t.Helper()
	if len(blob) == 0 {
		return 0
	}
	if _, err := c.Write(append(be32s(13, 0, typ), be32s(uint32(len(blob)))...)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(blob); err != nil {
		t.Fatal(err)
	}
	res := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, res); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint32(res)
}

func be32s(v ...uint32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.BigEndian.AppendUint32(b, x)
	}
	return b
}

// TestMigrateStateBlobs plays a live migration's control channel as QEMU
// 7.2 does (one kept connection per side): the source's three state blobs
// read once the VM stopped, the destination (a vTPM of a VM migrating in)
// initialised at its start, stopped, given the blobs and resumed with
// INIT(DELETE_VOLATILE). The destination journals nothing, a guest command
// waits until the bridges' handover is adopted, and then the guest sees the
// source's PCRs, its next extend continuing the source's event numbering,
// and a Startup(CLEAR) from guest user space is refused as on hardware.
func TestMigrateStateBlobs(t *testing.T) {
	src := newRig(t, nil, nil)
	src.powerOn(t)
	d := bytes.Repeat([]byte{0x5a}, 32)
	if _, err := extendCmd(10, d).Execute(src.tpm); err != nil {
		t.Fatal(err)
	}
	if rc := src.v.SetLocality(3); rc != 0 {
		t.Fatal(rc)
	}
	sc := qemuCtrl(t, serveCtrl(t, src.v))
	var blobs [4][]byte
	for typ := uint32(1); typ <= 3; typ++ {
		blobs[typ] = getBlob(t, sc, typ)
	}
	if len(blobs[3]) != 0 {
		t.Errorf("savestate blob of %d bytes, want none", len(blobs[3]))
	}

	dj := &vtpmtest.Journal{}
	dst, err := vtpm.New(vtpm.Config{Journal: dj, Logger: quietLog(), Incoming: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	client, server := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go dst.ServeData(ctx, server)
	dstTPM := transport.FromReadWriter(client)
	dc := qemuCtrl(t, serveCtrl(t, dst))
	rc := func(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
	if r := rc(ctrlCall(t, dc, 2, be32s(0), nil, 4)); r != 0 { // INIT at the destination's start
		t.Fatalf("INIT: %#x", r)
	}
	if r := rc(ctrlCall(t, dc, 14, nil, nil, 4)); r != 0 { // STOP
		t.Fatalf("STOP: %#x", r)
	}
	for typ := uint32(1); typ <= 3; typ++ {
		if r := setBlob(t, dc, typ, blobs[typ]); r != 0 {
			t.Fatalf("SET_STATEBLOB %d: %#x", typ, r)
		}
	}
	if r := rc(ctrlCall(t, dc, 2, be32s(1), nil, 4)); r != 0 { // INIT(DELETE_VOLATILE): resume
		t.Fatalf("resume INIT: %#x", r)
	}
	if got := dst.Locality(); got != 3 {
		t.Errorf("locality after the volatile blob: %d, want the source's 3", got)
	}

	// The guest reads PCR 10 before the handover: it must wait.
	type res struct {
		v   []byte
		err error
	}
	got := make(chan res, 1)
	go func() {
		rsp, err := (tpm2.PCRRead{PCRSelectionIn: pcrSel(tpm2.TPMAlgSHA256, 10)}).Execute(dstTPM)
		if err != nil {
			got <- res{err: err}
			return
		}
		got <- res{v: rsp.PCRValues.Digests[0].Buffer}
	}()
	select {
	case r := <-got:
		t.Fatalf("guest command answered before the handover: %x %v", r.v, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if ev := dj.Events(); len(ev) != 0 {
		t.Fatalf("the incoming vTPM journaled %v before it had an identity", ev)
	}
	if err := dst.Adopt(src.v.PCRs().Snapshot(), nil); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil {
		t.Fatal(r.err)
	}
	if want := src.v.PCRs().Read(vpcr.SHA256, 10); !bytes.Equal(r.v, want) {
		t.Fatalf("PCR 10 after migration %x, want the source's %x", r.v, want)
	}
	if err := dst.SetLocality(0); err != 0 {
		t.Fatal(err)
	}
	if _, err := extendCmd(10, d).Execute(dstTPM); err != nil {
		t.Fatal(err)
	}
	ev := dj.Events()
	if len(ev) != 1 || ev[0].Kind != vpcr.KindExtend || ev[0].Seq != src.v.PCRs().Seq()+1 {
		t.Fatalf("destination journal %v, want one extend with seq %d", ev, src.v.PCRs().Seq()+1)
	}
	if err := dst.Adopt(src.v.PCRs().Snapshot(), nil); err == nil {
		t.Error("a second Adopt was accepted")
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(dstTPM); err == nil {
		t.Error("Startup after a migration resume succeeded")
	}
	// The source is untouched by the reads: same PCRs, still running.
	if src.v.PCRs().Phase() != vpcr.PhaseRunning || len(src.j.Events()) != 3 {
		t.Errorf("source after GET_STATEBLOB: phase %v, %d events", src.v.PCRs().Phase(), len(src.j.Events()))
	}
}

// TestStateBlobRefusals: only a vTPM migrating in takes state blobs, and
// only this vTPM's own kind.
func TestStateBlobRefusals(t *testing.T) {
	if _, err := exec.LookPath("swtpm_ioctl"); err != nil {
		t.Skip("swtpm_ioctl not installed (Debian: swtpm-tools)")
	}
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage")
	os.WriteFile(garbage, bytes.Repeat([]byte{1}, 200), 0o600)
	big := filepath.Join(dir, "big")
	os.WriteFile(big, bytes.Repeat([]byte{1}, 10000), 0o600)

	rj := &vtpmtest.Journal{}
	running, err := vtpm.New(vtpm.Config{Journal: rj, Logger: quietLog()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	running.Init(context.Background())
	blob := filepath.Join(dir, "volatile")
	if out, err := exec.Command("swtpm_ioctl", "--unix", serveCtrl(t, running), "--save", "volatile", blob).CombinedOutput(); err != nil {
		t.Fatalf("save: %v %s", err, out)
	}
	before := running.PCRs()
	incoming, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}, Logger: quietLog(), Incoming: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		v    *vtpm.VTPM
		typ  string
		file string
		ok   bool
	}{
		{"own blob, incoming", incoming, "volatile", blob, true},
		{"own blob, running VM", running, "volatile", blob, false},
		{"garbage", incoming, "volatile", garbage, false},
		{"swtpm-sized", incoming, "permanent", big, false},
		{"volatile as permanent", incoming, "permanent", blob, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command("swtpm_ioctl", "--unix", serveCtrl(t, tc.v), "--load", tc.typ, tc.file).CombinedOutput()
			if (err == nil) != tc.ok {
				t.Fatalf("--load %s: err %v, want ok %v: %s", tc.typ, err, tc.ok, strings.TrimSpace(string(out)))
			}
		})
	}
	if after := running.PCRs(); !after.Equal(before) || len(rj.Events()) != 1 {
		t.Error("a refused blob changed the running vTPM")
	}
}
