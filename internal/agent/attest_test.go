package agent

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// TestAttest fetches a VM's evidence from inside the guest: straight from
// the bridge over the unix transport (no agent running), and through the
// running agent's control socket; binds a key through the control socket.
func TestAttest(t *testing.T) {
	r := newRig(t)
	v := r.newVM("attest")
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	cfg := g.config(t, v)
	cfg.ControlSocket = filepath.Join(t.TempDir(), "run", "tpmmux-agent.sock")
	os.MkdirAll(filepath.Dir(cfg.ControlSocket), 0o755)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	tests := []struct {
		name  string
		nonce []byte
		err   string
	}{
		{"empty nonce", nil, "nonce of 0 bytes"},
		{"long nonce", make([]byte, 65), "nonce of 65 bytes"},
		{"good nonce", []byte("nonce-1 of the verifier"), ""},
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run("direct/"+tt.name, func(t *testing.T) {
			resp, err := a.Attest(ctx, tt.nonce)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rep := checkEvidence(t, resp, tt.nonce, v.ident); rep.Counts.Measurements != 0 {
				t.Fatalf("%d measurements before the agent ran", rep.Counts.Measurements)
			}
		})
	}
	// No agent answers on the control socket: AttestAny asks the bridge.
	if _, via, err := AttestAny(ctx, cfg, []byte("n")); err != nil || via != "unix" {
		t.Fatalf("AttestAny without an agent: via %q, %v", via, err)
	}
	if err := a.Bind(ctx, "tls", [32]byte{}); err == nil {
		t.Fatal("bind without a running agent succeeded")
	}

	cur := start(t, cfg)
	v.waitNext(realEntries, 20*time.Second)
	fi, err := os.Stat(cfg.ControlSocket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, want a 0600 socket", fi.Mode())
	}
	nonce := []byte("through the agent")
	resp, err := AttestControl(ctx, cfg.ControlSocket, nonce)
	if err != nil {
		t.Fatal(err)
	}
	if rep := checkEvidence(t, resp, nonce, v.ident); rep.Counts.Measurements != realEntries {
		t.Fatalf("%d measurements, want %d", rep.Counts.Measurements, realEntries)
	}
	if _, via, err := AttestAny(ctx, cfg, []byte("n")); err != nil || via != "control" {
		t.Fatalf("AttestAny with an agent: via %q, %v", via, err)
	}
	// Several at once.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := []byte(fmt.Sprintf("concurrent nonce %d of 4", i))
			resp, err := AttestControl(ctx, cfg.ControlSocket, n)
			if err == nil {
				checkEvidence(t, resp, n, v.ident)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}

	// Bind a key through the control socket: a durable binding record.
	key := sha256.Sum256([]byte("guest tls public key"))
	if err := BindControl(ctx, cfg.ControlSocket, "tls", key); err != nil {
		t.Fatal(err)
	}
	rep := v.verified(realEntries, g.boot, "sha1")
	if rep.Counts.Bindings != 1 {
		t.Fatalf("%d bindings, want 1", rep.Counts.Bindings)
	}
	if err := BindControl(ctx, cfg.ControlSocket, "", key); err == nil {
		t.Fatal("empty purpose accepted")
	}

	// A second agent does not take the control socket over.
	second, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := second.Run(ctx); err == nil || !strings.Contains(err.Error(), "another agent") {
		t.Fatalf("second agent: %v", err)
	}
	cur.stop(t)
	if _, err := os.Stat(cfg.ControlSocket); !os.IsNotExist(err) {
		t.Fatalf("control socket left behind: %v", err)
	}
	if _, err := AttestControl(ctx, cfg.ControlSocket, []byte("n")); !NoAgent(err) {
		t.Fatalf("no agent: %v", err)
	}
}

// rawClient is a guest speaking the wire protocol by hand, with the ack
// latency of every frame it sent.
type rawClient struct {
	t  *testing.T
	c  *wire.Conn
	nc interface{ Close() error }

	mu   sync.Mutex
	sent map[uint64]time.Time
	lat  []time.Duration
}

func dialRaw(t *testing.T, v *vm, boot string) (*rawClient, wire.Welcome) {
	t.Helper()
	nc, err := transport.DialUnix(context.Background(), v.sock)
	if err != nil {
		t.Fatal(err)
	}
	c := &rawClient{t: t, c: wire.NewConn(nc, false), nc: nc, sent: make(map[uint64]time.Time)}
	if err := c.c.Send(wire.TypeHello, &wire.Hello{Proto: wire.Version, BootID: boot}); err != nil {
		t.Fatal(err)
	}
	f, err := c.c.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var w wire.Welcome
	if err := wire.Decode(f, &w); err != nil {
		t.Fatal(err)
	}
	return c, w
}

func (c *rawClient) send(seq, first uint64, es []wire.Entry) error {
	c.mu.Lock()
	c.sent[seq] = time.Now()
	c.mu.Unlock()
	return c.c.Send(wire.TypeMeasurements, &wire.Measurements{Seq: seq, First: first, Entries: es})
}

// recvAck reads the next ack and records its latency.
func (c *rawClient) recvAck() (wire.Ack, error) {
	f, err := c.c.Recv()
	if err != nil {
		return wire.Ack{}, err
	}
	var a wire.Ack
	if err := wire.Decode(f, &a); err != nil {
		return a, err
	}
	c.mu.Lock()
	c.lat = append(c.lat, time.Since(c.sent[a.Seq]))
	delete(c.sent, a.Seq)
	c.mu.Unlock()
	return a, nil
}

func percentiles(ds []time.Duration) (p50, p99, top time.Duration) {
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return at(0.50), at(0.99), s[len(s)-1]
}

// TestFloodIsolation: a guest that blasts measurement frames as fast as
// its socket takes them, ignoring the window, is slowed by backpressure;
// a quiet VM sending one entry at a time next to it keeps a bounded ack
// latency.
func TestFloodIsolation(t *testing.T) {
	r := newRig(t)
	floodVM, quietVM := r.newVM("flood"), r.newVM("quiet")
	es := realWireEntries(t)
	const quietN = 300
	quietBound := 200 * time.Millisecond
	if raceEnabled {
		quietBound = time.Second // the race detector slows the bridge several times
	}

	quiet, _ := dialRaw(t, quietVM, "quiet-boot")
	defer quiet.nc.Close()
	quietOne := func(i uint64) {
		t.Helper()
		if err := quiet.send(i, i, es[i%realEntries:i%realEntries+1]); err != nil {
			t.Fatal(err)
		}
		a, err := quiet.recvAck()
		if err != nil || a.Seq != i || a.Next != i+1 {
			t.Fatalf("quiet ack %+v, %v", a, err)
		}
	}
	// Baseline without the flood.
	for i := uint64(0); i < 100; i++ {
		quietOne(i)
	}
	b50, b99, bmax := percentiles(quiet.lat)
	quiet.lat = nil

	flood, _ := dialRaw(t, floodVM, "flood-boot")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const floodFrame = 128
	var floodWG sync.WaitGroup
	floodWG.Add(2)
	var floodSent uint64
	go func() { // blast
		defer floodWG.Done()
		for seq := uint64(0); ctx.Err() == nil; seq++ {
			batch := make([]wire.Entry, floodFrame)
			for j := range batch {
				batch[j] = es[(int(seq)*floodFrame+j)%realEntries]
			}
			if flood.send(seq, seq*floodFrame, batch) != nil {
				return
			}
			floodSent = seq + 1
		}
	}()
	go func() { // acks
		defer floodWG.Done()
		for {
			if _, err := flood.recvAck(); err != nil {
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond) // let the flood fill every queue
	start := time.Now()
	for i := uint64(100); i < 100+quietN; i++ {
		quietOne(i)
	}
	quietTime := time.Since(start)
	cancel()
	flood.nc.Close()
	floodWG.Wait()

	q50, q99, qmax := percentiles(quiet.lat)
	flood.mu.Lock()
	f50, f99, fmax := percentiles(flood.lat)
	floodAcked := len(flood.lat)
	flood.mu.Unlock()
	floodEntries := floodVM.next()
	t.Logf("quiet alone:      p50 %v p99 %v max %v (100 entries)", b50, b99, bmax)
	t.Logf("quiet under flood: p50 %v p99 %v max %v (%d entries in %v)", q50, q99, qmax, quietN, quietTime.Round(time.Millisecond))
	t.Logf("flood:            p50 %v p99 %v max %v per %d-entry frame; %d frames written, %d acked, %d entries durable (%.0f entries/s)",
		f50, f99, fmax, floodFrame, floodSent, floodAcked, floodEntries, float64(floodEntries)/(quietTime+200*time.Millisecond).Seconds())
	if q99 > quietBound {
		t.Errorf("quiet VM's ack p99 %v under the flood, over %v", q99, quietBound)
	}
	if floodEntries < 10*floodFrame {
		t.Errorf("the flood made no progress (%d entries): backpressure, not starvation, was expected", floodEntries)
	}
	quietVM.verified(100+quietN, "quiet-boot", "sha1")
}
