package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// serialLine imitates a virtio-serial channel as QEMU provides it, as
// measured with real QEMU/TCG guests:
//
//   - the host end is one long-lived byte stream (here a unix socketpair
//     handed to bridge.Serve with resync), whatever the guest does;
//   - the guest end is a port that agents open and close; only one may
//     hold it open;
//   - bytes the host sends while no guest has the port open are dropped;
//   - the host sees no EOF when the guest closes; a guest that closes in
//     the middle of a write leaves a torn frame on the host stream.
//
// restartHost replaces the host end (the bridge restarted and QEMU
// reconnected its chardev): the guest sees nothing of it.
type serialLine struct {
	t  *testing.T
	r  *rig
	id conceal.Digest

	mu       sync.Mutex
	host     net.Conn // the relay's end of the host stream
	hostGone chan struct{}
	guest    net.Conn // the relay's end of the open port, or nil
	opens    int
	wg       sync.WaitGroup
}

// socketPair returns both ends of a unix stream socketpair.
func socketPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var cs [2]net.Conn
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		cs[i] = c
	}
	return cs[0], cs[1]
}

func newSerialLine(t *testing.T, r *rig, id conceal.Digest) *serialLine {
	l := &serialLine{t: t, r: r, id: id}
	l.restartHost()
	t.Cleanup(func() {
		l.mu.Lock()
		l.host.Close()
		if l.guest != nil {
			l.guest.Close()
		}
		l.mu.Unlock()
		l.wg.Wait()
	})
	return l
}

// restartHost gives the bridge a new host stream, as a bridge restart
// would, and ends the old one.
func (l *serialLine) restartHost() {
	relay, bridgeEnd := socketPair(l.t)
	gone := make(chan struct{})
	l.mu.Lock()
	old := l.host
	l.host, l.hostGone = relay, gone
	l.mu.Unlock()
	if old != nil {
		old.Close()
	}
	l.wg.Add(2)
	go func() {
		defer l.wg.Done()
		l.r.b.Serve(context.Background(), l.id, bridgeEnd, true)
	}()
	// Host to guest: forwarded to the open port, or dropped.
	go func() {
		defer l.wg.Done()
		defer close(gone)
		buf := make([]byte, 4096)
		for {
			n, err := relay.Read(buf)
			if n > 0 {
				l.mu.Lock()
				g := l.guest
				l.mu.Unlock()
				if g != nil {
					g.Write(buf[:n]) // a port closing meanwhile drops it
				}
			}
			if err != nil {
				return
			}
		}
	}()
}

// inject writes raw bytes into the host stream as if the guest sent them.
func (l *serialLine) inject(b []byte) {
	l.mu.Lock()
	h := l.host
	l.mu.Unlock()
	if _, err := h.Write(b); err != nil {
		l.t.Error(err)
	}
}

// open opens the guest end of the port, as transport.Serial.Open would.
func (l *serialLine) open(ctx context.Context) (Stream, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.guest != nil {
		return nil, syscall.EBUSY
	}
	agentEnd, relay := net.Pipe()
	l.guest = relay
	l.opens++
	l.wg.Add(1)
	// Guest to host: a chunk at a time onto the current host stream. When
	// the agent closes its end the relay detaches; the host sees no EOF.
	go func() {
		defer l.wg.Done()
		buf := make([]byte, 512)
		for {
			n, err := relay.Read(buf)
			if n > 0 {
				l.mu.Lock()
				h := l.host
				l.mu.Unlock()
				h.Write(buf[:n])
			}
			if err != nil {
				l.mu.Lock()
				if l.guest == relay {
					l.guest = nil
				}
				l.mu.Unlock()
				relay.Close()
				return
			}
		}
	}()
	return agentEnd, nil
}

// serialConfig is a test configuration for an agent on the line, with a
// fast dead-bridge detection.
func (l *serialLine) config(t *testing.T, g *guest) Config {
	return Config{
		Transport:          transport.KindSerial,
		Dial:               l.open,
		IMAPath:            g.ima,
		BootIDPath:         g.bootID,
		PollInterval:       10 * time.Millisecond,
		PingInterval:       100 * time.Millisecond,
		PingTimeout:        600 * time.Millisecond,
		WriteTimeout:       2 * time.Second,
		BackoffMin:         5 * time.Millisecond,
		BackoffMax:         50 * time.Millisecond,
		MaxEntriesPerFrame: 8,
		Logger:             testLogger(t),
	}
}

// checkEvidence verifies an evidence response as a tenant would, with
// only what came in it (the identity and the AK) and the nonce.
func checkEvidence(t *testing.T, resp *wire.EvidenceResponse, nonce []byte, want *conceal.Identity) *verify.Report {
	t.Helper()
	ident := &conceal.Identity{UUID: resp.UUID, Instance: resp.Instance, Key: resp.Key}
	if *ident != *want {
		t.Fatal("evidence response carries another identity")
	}
	ev, err := evidence.Decode(resp.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := parseAK(resp.AKPEM)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AK: ak, PCR: 13})
	if err != nil {
		t.Fatalf("evidence does not verify: %v", err)
	}
	return rep
}

// TestSerialStream streams over a virtio-serial-like line that outlives
// the agents: agents restart on the same host stream (with a torn frame
// and stale bytes in between), the bridge restarts behind a port the agent
// keeps open (no EOF: the agent finds out by Ping), and an evidence request
// travels on the running agent's session. Every entry arrives once.
func TestSerialStream(t *testing.T) {
	r := newRig(t)
	id := r.newIdentity("serial")
	l := newSerialLine(t, r, id.ID())
	g := newGuest(t, nil, "binary_runtime_measurements")
	cfg := l.config(t, g)
	es := realWireEntries(t)

	// Stale bytes of an earlier boot's agent before the first hello.
	l.inject([]byte("stale \x00TM\x01 bytes"))
	written := grow(t, g.ima, readRealList(t), 7, 20*time.Millisecond)
	cur := start(t, cfg)
	v := &vm{r: r, name: "serial", ident: id, id: id.ID()}

	restarts, hostRestarts, attests := 0, 0, 0
	for step := 0; ; step++ {
		select {
		case <-written:
		case <-time.After(80 * time.Millisecond):
			n := v.next()
			if n == 0 || n >= realEntries {
				continue
			}
			switch step % 3 {
			case 0:
				// The agent dies mid-frame: half a frame is left on the
				// host stream, then a new agent opens the port.
				cur.stop(t)
				frame, err := wire.Encode(wire.TypeMeasurements, &wire.Measurements{Seq: 1, First: n, Entries: es[n:min(n+20, realEntries)]})
				if err != nil {
					t.Fatal(err)
				}
				l.inject(frame[:len(frame)/2])
				cur = start(t, cfg)
				restarts++
			case 1:
				l.restartHost()
				hostRestarts++
			case 2:
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				nonce := []byte{byte(step), 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
				resp, err := cur.a.Attest(ctx, nonce)
				cancel()
				if err != nil {
					t.Fatalf("attest on the running serial session: %v", err)
				}
				rep := checkEvidence(t, resp, nonce, id)
				if rep.Counts.Measurements < int(n) {
					t.Fatalf("evidence holds %d measurements, the bridge had %d", rep.Counts.Measurements, n)
				}
				attests++
			}
			continue
		}
		break
	}
	v.waitNext(realEntries, 30*time.Second)
	t.Logf("%d agent restarts with torn frames, %d bridge restarts, %d attests on the session, %d port opens", restarts, hostRestarts, attests, l.opens)
	if restarts < 2 || hostRestarts < 2 || attests < 2 {
		t.Errorf("not every disruption happened mid-stream")
	}
	v.verified(realEntries, g.boot, "sha1")

	// After the stream: an attest on the idle session, then the agent ends.
	nonce := []byte("after the reconnect: a nonce")
	resp, err := cur.a.Attest(context.Background(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	if rep := checkEvidence(t, resp, nonce, id); rep.Counts.Measurements != realEntries {
		t.Fatalf("%d measurements", rep.Counts.Measurements)
	}
}

// TestSerialAttestThenRun: with no agent running, `tpmmux-agent attest`
// opens the port itself and the bridge serves it as an evidence-only
// stream; the agent that starts afterwards says hello on the same host
// stream and must be served (the stream is the VM's only channel).
func TestSerialAttestThenRun(t *testing.T) {
	r := newRig(t)
	id := r.newIdentity("serial-attest")
	l := newSerialLine(t, r, id.ID())
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	cfg := l.config(t, g)

	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nonce := []byte("before the agent started")
	resp, err := a.Attest(ctx, nonce)
	if err != nil {
		t.Fatal(err)
	}
	if rep := checkEvidence(t, resp, nonce, id); rep.Counts.Measurements != 0 {
		t.Fatalf("%d measurements before the agent ran", rep.Counts.Measurements)
	}
	start(t, cfg)
	v := &vm{r: r, name: "serial-attest", ident: id, id: id.ID()}
	v.waitNext(realEntries, 20*time.Second)
	v.verified(realEntries, g.boot, "sha1")
}

// TestSerialPortBusy: while the agent holds the port, another opener is
// refused (EBUSY), so attest must go through the agent.
func TestSerialPortBusy(t *testing.T) {
	r := newRig(t)
	id := r.newIdentity("serial-busy")
	l := newSerialLine(t, r, id.ID())
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	cfg := l.config(t, g)
	cur := start(t, cfg)
	v := &vm{r: r, name: "serial-busy", ident: id, id: id.ID()}
	v.waitNext(realEntries, 20*time.Second)
	other, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := other.Attest(ctx, []byte("n")); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("second opener: %v, want EBUSY", err)
	}
	if _, err := cur.a.Attest(ctx, []byte("n")); err != nil {
		t.Fatal(err)
	}
}

// TestSerialBridgeRestartThenAttest: the bridge restarts behind the port
// and the first thing the new bridge reads is an evidence request from the
// running session, so it serves the stream as an evidence-only one: it
// answers pings but takes no measurements. The agent must notice that its
// frames go unacknowledged and say hello again.
func TestSerialBridgeRestartThenAttest(t *testing.T) {
	r := newRig(t)
	id := r.newIdentity("serial-restart-attest")
	l := newSerialLine(t, r, id.ID())
	list := readRealList(t)
	bounds := entryBounds(t, list, 20)
	g := newGuest(t, list[:bounds[200]], "binary_runtime_measurements")
	cfg := l.config(t, g)
	cfg.PingTimeout = time.Second
	cfg.PingInterval = 100 * time.Millisecond
	cur := start(t, cfg)
	v := &vm{r: r, name: "serial-restart-attest", ident: id, id: id.ID()}
	v.waitNext(200, 20*time.Second)

	l.restartHost()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nonce := []byte("right after the restart")
	resp, err := cur.a.Attest(ctx, nonce)
	if err != nil {
		t.Fatal(err)
	}
	checkEvidence(t, resp, nonce, id)
	f, err := os.OpenFile(g.ima, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(list[bounds[200]:])
	f.Close()
	start := time.Now()
	v.waitNext(realEntries, 30*time.Second)
	t.Logf("resumed after %v", time.Since(start).Round(time.Millisecond))
	v.verified(realEntries, g.boot, "sha1")
}

// TestSerialBridgeRestartAsksHello: on virtio-serial the guest cannot see
// the host end change (a bridge restart, or a VM that migrated to another
// host's bridge). The new bridge answers the agent's first ping or frame
// outside a session with a "hello" error, and the agent starts a new
// session at once, not at its ping timeout (a minute here).
func TestSerialBridgeRestartAsksHello(t *testing.T) {
	r := newRig(t)
	id := r.newIdentity("hello")
	l := newSerialLine(t, r, id.ID())
	g := newGuest(t, nil, "binary_runtime_measurements")
	cfg := l.config(t, g)
	cfg.PingTimeout = time.Minute
	list := readRealList(t)
	half := entryBounds(t, list, 20)[realEntries/2]
	if err := os.WriteFile(g.ima, list[:half], 0o644); err != nil {
		t.Fatal(err)
	}
	cur := start(t, cfg)
	defer cur.stop(t)
	v := &vm{r: r, name: "hello", ident: id, id: id.ID()}
	v.waitNext(realEntries/2, 20*time.Second)
	l.restartHost()
	if err := os.WriteFile(g.ima, list, 0o644); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	v.waitNext(realEntries, 10*time.Second) // far under the one-minute ping timeout
	t.Logf("the agent resumed on the restarted bridge after %v", time.Since(began).Round(time.Millisecond))
	v.verified(realEntries, g.boot, "sha1")
}
