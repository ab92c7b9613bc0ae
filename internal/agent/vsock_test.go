package agent

// Sessions over a real AF_VSOCK stack. This host's kernel has neither
// vsock_loopback nor vhost_vsock, so these tests skip here;
// scripts/vmtest/run.sh runs them in a QEMU guest that has both, and fails
// if any of them skips:
//
//   - TestRealVsock* (TPMMUX_VSOCK_REAL=1): the bridge and the agent in one
//     guest kernel, over vsock_loopback. Every peer CID is then 1
//     (VMADDR_CID_LOCAL), so the session tests listen with the pieces
//     transport.ListenVsock is made of (vsock.Listen on the per-VM port and
//     transport.CheckCID with VsockPeerCID) expecting CID 1, and
//     transport.ListenVsock itself, which expects a guest CID >= 3, is
//     what refuses.
//   - TestNestedVsockBridge (TPMMUX_VSOCK_NESTED_QEMU set): the bridge in
//     the guest on transport.ListenVsock over /dev/vhost-vsock, and a
//     nested QEMU guest (-device vhost-vsock-pci,guest-cid=N) running
//     TestNestedVsockGuest: the unmodified agent (transport.DialVsock,
//     which reads the guest's own CID) with a real guest CID.

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/vsock"

	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// Environment scripts/vmtest sets.
const (
	realVsockEnv   = "TPMMUX_VSOCK_REAL"         // 1: vsock_loopback is loaded
	nestedQEMUEnv  = "TPMMUX_VSOCK_NESTED_QEMU"  // the QEMU binary for the nested guest
	nestedDirEnv   = "TPMMUX_VSOCK_NESTED_DIR"   // kernel, initrd.img, firmware/
	nestedGuestEnv = "TPMMUX_VSOCK_NESTED_GUEST" // "CID,OTHERCID,NONCEHEX,REPORTPORT" in the nested guest
	nestedReport   = transport.VsockPortBase - 1 // where the nested guest reports, outside the per-VM ports
)

func requireRealVsock(t *testing.T) {
	t.Helper()
	if os.Getenv(realVsockEnv) != "1" {
		t.Skipf("needs a real AF_VSOCK stack (vsock_loopback), which this kernel lacks: scripts/vmtest/run.sh runs this test in a QEMU guest that has one (it sets %s=1)", realVsockEnv)
	}
}

// vsockServer serves one VM of the rig on a vsock listener, as the daemon
// does: every accepted connection goes to bridge.Serve.
type vsockServer struct {
	v      *vm
	l      transport.Listener
	cancel context.CancelFunc
	done   chan struct{}
}

// serveVsock serves v on l until stop.
func (r *rig) serveVsock(v *vm, l transport.Listener) *vsockServer {
	ctx, cancel := context.WithCancel(context.Background())
	s := &vsockServer{v: v, l: l, cancel: cancel, done: make(chan struct{})}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer close(s.done)
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			c, err := l.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					r.t.Errorf("accept on %s: %v, want net.ErrClosed once closed", l.Addr(), err)
				}
				return
			}
			v.mu.Lock()
			v.conns = append(v.conns, c)
			v.mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); r.b.Serve(ctx, v.id, c, l.Resync()) }()
		}
	}()
	r.t.Cleanup(s.stop)
	return s
}

// closeListener stops accepting; connections already served go on.
func (s *vsockServer) closeListener(t *testing.T) {
	t.Helper()
	if err := s.l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatal(err)
	}
}

// stop closes the listener and ends the VM's sessions (bridge.Serve
// returns when its connection closes).
func (s *vsockServer) stop() {
	s.l.Close()
	s.cancel()
	s.v.dropConns()
	<-s.done
}

// loopbackListen listens on the per-VM port of guest CID cid and accepts
// peers with the loopback's CID, as ListenVsock does for a guest's CID.
func loopbackListen(t *testing.T, cid uint32) transport.Listener {
	t.Helper()
	port, err := transport.VsockPort(cid)
	if err != nil {
		t.Fatal(err)
	}
	l, err := vsock.Listen(port, nil)
	if err != nil {
		t.Fatalf("listen vsock port %d: %v", port, err)
	}
	return transport.CheckCID(l, vsock.Local, transport.VsockPeerCID, testLogger(t))
}

// dialCounter dials the per-VM vsock port of cid on the host CID (the
// port transport.DialVsock computes from the guest's CID, which the
// loopback does not have) and counts what happened.
type dialCounter struct {
	port          uint32
	ok, reset     atomic.Int64
	other         atomic.Int64
	lastOtherErr  atomic.Value
	lastResetText atomic.Value
}

func (d *dialCounter) dial(ctx context.Context) (Stream, error) {
	c, err := vsock.DialContext(ctx, transport.HostCID, d.port, nil)
	switch {
	case err == nil:
		d.ok.Add(1)
		return c, nil
	case errors.Is(err, syscall.ECONNRESET):
		d.reset.Add(1)
		d.lastResetText.Store(err.Error())
	default:
		d.other.Add(1)
		d.lastOtherErr.Store(err.Error())
	}
	return nil, err
}

// appendList appends list[from:to] to the guest's measurement list, as the
// kernel appends new entries.
func appendList(t *testing.T, path string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond every 10 ms for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRealVsockSession runs the agent against the real bridge (mux on the TPM
// simulator) over vsock: hello and a first stream, an attest over its own
// vsock connection whose evidence verifies, a reconnect after the bridge
// drops the stream (resume where the bridge says), the listener closing
// while the guest is connected (the established stream still carries
// frames; new dials are reset while nobody listens), and a new listener
// on the same port that the agent finds by itself. In the end the VM's
// evidence verifies with each of the 454 IMA entries exactly once.
func TestRealVsockSession(t *testing.T) {
	requireRealVsock(t)
	const cid = 3101
	r := newRig(t)
	ident := r.newIdentity("vsock-session")
	v := &vm{r: r, name: "vsock-session", ident: ident, id: ident.ID()}
	srv := r.serveVsock(v, loopbackListen(t, cid))

	list := readRealList(t)
	bounds := entryBounds(t, list, 20)
	parts := []int{150, 300, 380, realEntries} // the list grows in four steps
	g := newGuest(t, list[:bounds[parts[0]]], "binary_runtime_measurements")
	port, _ := transport.VsockPort(cid)
	d := &dialCounter{port: port}
	cfg := g.config(t, v)
	cfg.Transport, cfg.UnixPath, cfg.Dial = transport.KindVsock, "", d.dial
	run := start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// 1. Hello, the first part of the list, and an attest from the guest.
	v.waitNext(uint64(parts[0]), time.Minute)
	nonce := []byte("vsock attest 1, a nonce of the verifier")
	resp, err := run.a.Attest(ctx, nonce)
	if err != nil {
		t.Fatalf("attest over vsock: %v", err)
	}
	if rep := checkEvidence(t, resp, nonce, v.ident); rep.Counts.Measurements != parts[0] {
		t.Fatalf("attest: %d measurements, want %d", rep.Counts.Measurements, parts[0])
	}
	if ak, err := parseAK(resp.AKPEM); err != nil || !ak.Equal(r.b.Mux.AK()) {
		t.Fatalf("the evidence response carries another AK than the bridge's (%v)", err)
	}
	dials := d.ok.Load()

	// 2. The bridge drops the stream: the agent says hello again and
	// resumes where the bridge says.
	if n := v.dropConns(); n == 0 {
		t.Fatal("no connection to drop")
	}
	appendList(t, g.ima, list[bounds[parts[0]]:bounds[parts[1]]])
	v.waitNext(uint64(parts[1]), time.Minute)
	if d.ok.Load() <= dials {
		t.Fatalf("no new vsock connection after the bridge dropped the stream (%d dials)", d.ok.Load())
	}
	dials = d.ok.Load()

	// 3. The listener closes while the guest is connected: the stream goes on.
	srv.closeListener(t)
	appendList(t, g.ima, list[bounds[parts[1]]:bounds[parts[2]]])
	v.waitNext(uint64(parts[2]), time.Minute)
	if d.ok.Load() != dials {
		t.Fatalf("%d new connections while the stream was up, want none", d.ok.Load()-dials)
	}

	// 4. Then the stream ends too (the VM's sessions are torn down): the
	// agent's dials are reset while nobody listens on the port.
	resets := d.reset.Load()
	v.dropConns()
	waitFor(t, time.Minute, "reset dials", func() bool { return d.reset.Load() >= resets+3 })
	if d.other.Load() != 0 {
		t.Fatalf("dial errors other than a reset: %v", d.lastOtherErr.Load())
	}
	t.Logf("while nobody listens: %v", d.lastResetText.Load())

	// 5. A new listener on the same port: the agent reconnects by itself.
	r.serveVsock(v, loopbackListen(t, cid))
	appendList(t, g.ima, list[bounds[parts[2]]:])
	v.waitNext(realEntries, time.Minute)
	v.verified(realEntries, g.boot, "sha1")
	nonce = []byte("vsock attest 2, a nonce of the verifier")
	resp, err = run.a.Attest(ctx, nonce)
	if err != nil {
		t.Fatalf("attest over vsock after the reconnects: %v", err)
	}
	if rep := checkEvidence(t, resp, nonce, v.ident); rep.Counts.Measurements != realEntries {
		t.Fatalf("attest: %d measurements, want %d", rep.Counts.Measurements, realEntries)
	}
	t.Logf("vsock dials: %d connected, %d reset", d.ok.Load(), d.reset.Load())
}

// TestRealVsockPeerCIDRefused serves a VM on transport.ListenVsock(cid), which
// accepts only peer CID cid, and runs the agent from a peer with another
// CID (the loopback's): every connection is refused before the bridge sees
// a byte, the agent keeps retrying, and the VM's log stays empty.
func TestRealVsockPeerCIDRefused(t *testing.T) {
	requireRealVsock(t)
	const cid = 3102
	r := newRig(t)
	ident := r.newIdentity("vsock-impostor")
	v := &vm{r: r, name: "vsock-impostor", ident: ident, id: ident.ID()}
	l, err := transport.ListenVsock(cid, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.serveVsock(v, l)
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	port, _ := transport.VsockPort(cid)
	d := &dialCounter{port: port}
	cfg := g.config(t, v)
	cfg.Transport, cfg.UnixPath, cfg.Dial = transport.KindVsock, "", d.dial
	start(t, cfg)
	waitFor(t, time.Minute, "three connections, refused", func() bool { return l.Refused() >= 3 && d.ok.Load() >= 3 })
	if v.next() != 0 {
		t.Fatalf("the bridge holds %d entries from a peer with the wrong CID", v.next())
	}
	v.mu.Lock()
	served := len(v.conns)
	v.mu.Unlock()
	if served != 0 {
		t.Fatalf("%d connections from the wrong CID reached the bridge", served)
	}
	// The same kernel, the same agent, a listener that expects the peer's
	// CID: the stream flows, so the refusals above were the CID check's.
	r.serveVsock(v, loopbackListen(t, cid+1))
	d.port++
	v.waitNext(realEntries, time.Minute)
	v.verified(realEntries, g.boot, "sha1")
}

// nestedReportMsg is what the nested guest sends to the bridge's test after
// its agent streamed: its CID as it read it, whether a dial to another
// VM's port was refused, and evidence for the nonce.
type nestedReportMsg struct {
	CID         uint32
	Refused     bool
	RefusedNote string
	Evidence    *wire.EvidenceResponse
	Err         string
}

// TestNestedVsockBridge is the host half of the nested test: the bridge on
// transport.ListenVsock(guestCID) over this guest's /dev/vhost-vsock, a
// listener for another VM's CID, and a nested TCG guest with
// vhost-vsock-pci guest-cid=guestCID whose agent streams the real IMA list.
// The VM's evidence must verify with every entry once, the evidence the
// nested guest fetched for our nonce over vsock must verify, and the
// nested guest's dial to the other VM's port must be refused there.
func TestNestedVsockBridge(t *testing.T) {
	qemu, dir := os.Getenv(nestedQEMUEnv), os.Getenv(nestedDirEnv)
	if qemu == "" || dir == "" {
		t.Skipf("needs a kernel with vhost_vsock and a QEMU for a nested guest: scripts/vmtest/run.sh runs this test in a QEMU guest that has them (it sets %s and %s)", nestedQEMUEnv, nestedDirEnv)
	}
	if err := transport.VsockAvailable(); err != nil {
		t.Fatal(err)
	}
	const guestCID, otherCID = 42, 43
	r := newRig(t)
	ident := r.newIdentity("nested")
	v := &vm{r: r, name: "nested", ident: ident, id: ident.ID()}
	l, err := transport.ListenVsock(guestCID, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.serveVsock(v, l)
	other, err := transport.ListenVsock(otherCID, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	otherVM := &vm{r: r, name: "other"}
	r.serveVsock(otherVM, other)
	rl, err := vsock.Listen(nestedReport, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rl.Close()
	reports := make(chan nestedReportMsg, 1)
	go func() {
		c, err := rl.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var m nestedReportMsg
		if err := json.NewDecoder(c).Decode(&m); err != nil {
			m.Err = fmt.Sprintf("decode the report: %v", err)
		}
		if a, ok := c.RemoteAddr().(*vsock.Addr); !ok || a.ContextID != guestCID {
			m.Err += fmt.Sprintf("; report from %v, not cid %d", c.RemoteAddr(), guestCID)
		}
		reports <- m
	}()

	nonce := []byte("nested vhost-vsock nonce")
	console := filepath.Join(t.TempDir(), "console.log")
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg", "-m", "384", "-smp", "1", "-cpu", "max",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-L", filepath.Join(dir, "firmware"),
		"-kernel", filepath.Join(dir, "kernel"), "-initrd", filepath.Join(dir, "initrd.img"),
		"-append", fmt.Sprintf("console=ttyS0 panic=-1 quiet tpmmux_vmtest.guest=%d,%d,%s,%d", guestCID, otherCID, hex.EncodeToString(nonce), nestedReport),
		"-serial", "file:"+console,
		"-device", fmt.Sprintf("vhost-vsock-pci,guest-cid=%d", guestCID),
	)
	var qerr strings.Builder
	cmd.Stderr = &qerr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// The nested guest's console, as it comes (a TCG guest in a TCG guest
	// is slow: this shows where the time goes).
	tailDone := make(chan struct{})
	go func() {
		defer close(tailDone)
		var off int
		tick := time.NewTicker(2 * time.Second)
		defer tick.Stop()
		show := func() {
			b, _ := os.ReadFile(console)
			if len(b) > off {
				for _, line := range strings.Split(strings.TrimRight(string(b[off:]), "\n"), "\n") {
					t.Logf("nested console +%v: %s", time.Since(t0).Round(time.Second), line)
				}
				off = len(b)
			}
		}
		for {
			show()
			select {
			case <-ctx.Done():
				show()
				return
			case <-tick.C:
			}
		}
	}()
	defer func() {
		cancel()
		<-exited
		<-tailDone
	}()

	var rep nestedReportMsg
	select {
	case rep = <-reports:
	case err := <-exited:
		exited <- err
		t.Fatalf("the nested guest exited before reporting: %v %s", err, qerr.String())
	case <-ctx.Done():
		t.Fatalf("no report from the nested guest within %v", time.Since(t0))
	}
	t.Logf("nested guest reported after %v", time.Since(t0).Round(time.Second))
	if rep.Err != "" {
		t.Fatalf("nested guest: %s", rep.Err)
	}
	if rep.CID != guestCID {
		t.Fatalf("nested guest read CID %d, want %d", rep.CID, guestCID)
	}
	// The bridge's side: all entries, once, from the real guest CID.
	v.waitNext(realEntries, time.Minute)
	v.verified(realEntries, "b00710d0-0000-4000-8000-000000000001", "sha1")
	if l.Refused() != 0 {
		t.Fatalf("the VM's listener refused %d connections from its own CID", l.Refused())
	}
	// The evidence the guest fetched over its own vsock connection.
	if rep.Evidence == nil {
		t.Fatal("no evidence in the report")
	}
	ev, err := evidence.Decode(rep.Evidence.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	vr, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: v.ident, AK: r.b.Mux.AK(), PCR: 13})
	if err != nil {
		t.Fatalf("the nested guest's evidence does not verify: %v", err)
	}
	if vr.Counts.Measurements != realEntries {
		t.Fatalf("the nested guest's evidence has %d measurements, want %d", vr.Counts.Measurements, realEntries)
	}
	// The wrong CID: the guest (CID guestCID) dialled the port of otherCID.
	if !rep.Refused {
		t.Fatalf("the nested guest's dial to CID %d's port was not refused: %s", otherCID, rep.RefusedNote)
	}
	if other.Refused() != 1 {
		t.Fatalf("the other VM's listener refused %d connections, want 1", other.Refused())
	}
	otherVM.mu.Lock()
	n := len(otherVM.conns)
	otherVM.mu.Unlock()
	if n != 0 {
		t.Fatalf("a connection from CID %d reached the bridge for CID %d", guestCID, otherCID)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("nested QEMU: %v %s", err, qerr.String())
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the nested guest did not power off")
	}
	b, _ := os.ReadFile(console)
	if !strings.Contains(string(b), "VMTEST-INNER-RESULT 0") {
		t.Fatal("the nested guest's test did not pass (see its console below)")
	}
	t.Logf("nested guest: boot to powered off %v", time.Since(t0).Round(time.Second))
}

// TestNestedVsockGuest is the guest half of the nested test; it runs only
// in the nested guest of TestNestedVsockBridge (tpmmux_vmtest.guest on its
// kernel command line). The agent is configured as in production: vsock,
// no dialer of the test's, so transport.DialVsock reads this guest's CID and
// dials the host on its per-VM port.
func TestNestedVsockGuest(t *testing.T) {
	spec := os.Getenv(nestedGuestEnv)
	if spec == "" {
		t.Skipf("runs only inside the nested guest of TestNestedVsockBridge (scripts/vmtest sets %s)", nestedGuestEnv)
	}
	f := strings.Split(spec, ",")
	if len(f) != 4 {
		t.Fatalf("%s=%q, want CID,OTHERCID,NONCEHEX,REPORTPORT", nestedGuestEnv, spec)
	}
	want, err1 := strconv.ParseUint(f[0], 10, 32)
	otherCID, err2 := strconv.ParseUint(f[1], 10, 32)
	nonce, err3 := hex.DecodeString(f[2])
	reportPort, err4 := strconv.ParseUint(f[3], 10, 32)
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		t.Fatalf("%s=%q: %v", nestedGuestEnv, spec, err)
	}
	var rep nestedReportMsg
	defer func() {
		if t.Failed() && rep.Err == "" {
			rep.Err = "the nested guest's test failed (see its console)"
		}
		c, err := vsock.Dial(transport.HostCID, uint32(reportPort), nil)
		if err != nil {
			t.Errorf("report: %v", err)
			return
		}
		defer c.Close()
		if err := json.NewEncoder(c).Encode(&rep); err != nil {
			t.Errorf("report: %v", err)
		}
	}()

	cid, err := transport.GuestCID()
	if err != nil {
		t.Fatal(err)
	}
	rep.CID = cid
	if uint64(cid) != want {
		t.Fatalf("guest CID %d, want %d", cid, want)
	}
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	cfg := Config{
		IMAPath:      g.ima,
		BootIDPath:   g.bootID,
		PollInterval: 50 * time.Millisecond,
		PingInterval: 5 * time.Second,
		PingTimeout:  60 * time.Second,
		WriteTimeout: 60 * time.Second,
		BackoffMin:   50 * time.Millisecond,
		BackoffMax:   time.Second,
		Logger:       testLogger(t),
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if a.Config().Transport != transport.KindVsock {
		t.Fatalf("default transport %s, want vsock", a.Config().Transport)
	}
	if err := a.Preflight(); err != nil {
		t.Fatal(err)
	}
	start(t, cfg)

	// Wait until the bridge holds every entry: ask for evidence over vsock
	// and count its measurement records (the host verifies it).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	for {
		resp, err := a.Attest(ctx, nonce)
		if err != nil {
			// The agent retries its own dials; a dial of Attest can time
			// out too in a guest this slow (10 s, DefaultDialTimeout).
			if ctx.Err() != nil {
				t.Fatalf("attest over vsock: %v", err)
			}
			t.Logf("attest over vsock: %v; again", err)
			time.Sleep(time.Second)
			continue
		}
		n, err := countMeasurements(resp)
		if err != nil {
			t.Fatal(err)
		}
		if n == realEntries {
			rep.Evidence = resp
			break
		}
		if n > realEntries {
			t.Fatalf("%d measurements, more than the list has", n)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// An impostor: this guest dials the port of another VM's CID. The
	// bridge there must close it before answering anything.
	port, err := transport.VsockPort(uint32(otherCID))
	if err != nil {
		t.Fatal(err)
	}
	c, err := vsock.Dial(transport.HostCID, port, nil)
	if err != nil {
		rep.RefusedNote = fmt.Sprintf("dial: %v", err)
		t.Fatalf("dial the other VM's port: %v (the bridge listens there)", err)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Minute))
	nr, err := c.Read(make([]byte, 1))
	c.Close()
	rep.RefusedNote = fmt.Sprintf("read %d bytes, %v", nr, err)
	rep.Refused = nr == 0 && (err == io.EOF || errors.Is(err, syscall.ECONNRESET))
	if !rep.Refused {
		t.Fatalf("the other VM's port answered a guest with CID %d: %s", cid, rep.RefusedNote)
	}
}

// countMeasurements counts the measurement records of an evidence
// response, without verifying it.
func countMeasurements(resp *wire.EvidenceResponse) (int, error) {
	ev, err := evidence.Decode(resp.Evidence)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, er := range ev.Records {
		r, err := record.Unmarshal(er.R)
		if err != nil {
			return 0, err
		}
		if r.Kind == record.KindMeasurement {
			n++
		}
	}
	return n, nil
}
