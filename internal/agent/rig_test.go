package agent

// Test rig: a real bridge (bridge.Bridge over mux.Open on the "sim" TPM and
// a logstore in a temp dir) serving VMs over unix sockets, the real IMA
// list of a guest, and checks that a VM's evidence verifies with each IMA
// entry exactly once. The "sim" TPM is a process singleton: none of these
// tests run in parallel.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

const realList = "../ima/testdata/guest-imasig-sha256.bin"

// realEntries is the number of entries in realList.
const realEntries = 454

func readRealList(t testing.TB) []byte {
	t.Helper()
	b, err := os.ReadFile(realList)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// entryBounds returns the byte offset of every entry of list, and its end.
func entryBounds(t testing.TB, list []byte, hashSize int) []int {
	t.Helper()
	rd, err := ima.NewReaderOptions(bytes.NewReader(list), ima.Options{TemplateHashSize: hashSize})
	if err != nil {
		t.Fatal(err)
	}
	out := []int{0}
	for {
		if _, err := rd.Next(); err != nil {
			break
		}
		out = append(out, int(rd.Offset()))
	}
	return out
}

// sha256List re-encodes list as the per-bank list
// binary_runtime_measurements_sha256: the template-hash column holds each
// entry's SHA-256 template digest.
func sha256List(t testing.TB, list []byte) []byte {
	t.Helper()
	es, err := ima.ParseList(list)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for _, e := range es {
		h := sha256.Sum256(e.TemplateData)
		e.TemplateHash = h[:]
		if out, err = e.AppendBinary(out); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// testLogger logs to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// rig is a bridge with a multiplexer on the simulator.
type rig struct {
	t  *testing.T
	b  *bridge.Bridge
	wg sync.WaitGroup
}

func newRig(t *testing.T) *rig {
	t.Helper()
	m := muxtest.Open(t, mux.Config{})
	r := &rig{t: t, b: &bridge.Bridge{Mux: m, Log: testLogger(t)}}
	t.Cleanup(r.wg.Wait)
	return r
}

// vm is one VM of the rig, served on a unix socket.
type vm struct {
	r     *rig
	name  string
	ident *conceal.Identity
	id    conceal.Digest
	sock  string

	mu    sync.Mutex
	conns []net.Conn // bridge ends of the connections served
}

// newIdentity starts a VM instance: its identity and genesis record.
func (r *rig) newIdentity(name string) *conceal.Identity {
	r.t.Helper()
	var u [16]byte
	copy(u[:], name)
	ident, err := r.b.Mux.NewVM(context.Background(), mux.Launch{UUID: u, Name: name})
	if err != nil {
		r.t.Fatal(err)
	}
	return ident
}

// realWireEntries is the real list as wire entries.
func realWireEntries(t testing.TB) []wire.Entry {
	t.Helper()
	es, err := ima.ParseList(readRealList(t))
	if err != nil {
		t.Fatal(err)
	}
	out := make([]wire.Entry, len(es))
	for i, e := range es {
		out[i] = wire.Entry{PCR: e.PCR, HashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, Data: e.TemplateData}
	}
	return out
}

// parseAK reads the AK from its PEM form.
func parseAK(p []byte) (*ecdsa.PublicKey, error) {
	blk, _ := pem.Decode(p)
	if blk == nil {
		return nil, errors.New("no PEM block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	ec, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("AK is %T", k)
	}
	return ec, nil
}

// newVM creates a VM instance and serves it on a unix socket.
func (r *rig) newVM(name string) *vm {
	t := r.t
	t.Helper()
	ident := r.newIdentity(name)
	v := &vm{r: r, name: name, ident: ident, id: ident.ID(), sock: filepath.Join(t.TempDir(), name+".sock")}
	l, err := transport.ListenUnix(v.sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		var wg sync.WaitGroup
		defer wg.Wait()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			v.mu.Lock()
			v.conns = append(v.conns, c)
			v.mu.Unlock()
			wg.Add(1)
			go func() { defer wg.Done(); r.b.Serve(ctx, v.id, c, l.Resync()) }()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		cancel()
		v.dropConns()
	})
	return v
}

// dropConns closes every connection the bridge serves for the VM, from the
// bridge's side.
func (v *vm) dropConns() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	n := len(v.conns)
	for _, c := range v.conns {
		c.Close()
	}
	v.conns = nil
	return n
}

// next is the next IMA index the bridge needs for the VM.
func (v *vm) next() uint64 {
	gs, err := v.r.b.Mux.Guest(v.id)
	if err != nil {
		v.r.t.Fatal(err)
	}
	return gs.Next
}

// waitNext waits until the bridge holds n entries of the VM.
func (v *vm) waitNext(n uint64, within time.Duration) {
	v.r.t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := v.next()
		if got == n {
			return
		}
		if got > n {
			v.r.t.Fatalf("bridge holds %d entries, more than the %d the guest has", got, n)
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 4<<20)
			buf = buf[:runtime.Stack(buf, true)]
			os.WriteFile(filepath.Join(os.TempDir(), "tpmmux-agent-test-stacks.txt"), buf, 0o644)
			v.r.t.Fatalf("bridge holds %d entries after %v, want %d (goroutines in %s)", got, within, n, filepath.Join(os.TempDir(), "tpmmux-agent-test-stacks.txt"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// verified fetches fresh evidence for the VM, verifies it and checks that
// its measurement records are IMA entries 0..n-1 in order, each once, all
// of boot bootID with template hash algorithm alg.
func (v *vm) verified(n int, bootID, alg string) *verify.Report {
	t := v.r.t
	t.Helper()
	nonce := []byte("rig-nonce of the verifier")
	ev, err := v.r.b.Mux.Evidence(context.Background(), v.id, nonce)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: v.ident, AK: v.r.b.Mux.AK(), PCR: 13})
	if err != nil {
		t.Fatalf("evidence of %s does not verify: %v", v.name, err)
	}
	if rep.Counts.Measurements != n {
		t.Fatalf("%s: %d measurements verified, want %d (none lost, none doubled)", v.name, rep.Counts.Measurements, n)
	}
	checkLogIndexes(t, ev.Records, n, bootID, alg)
	return rep
}

// checkLogIndexes checks that the measurement records among recs are IMA
// entries 0..n-1 in order.
func checkLogIndexes(t *testing.T, recs []evidence.Record, n int, bootID, alg string) {
	t.Helper()
	want := uint64(0)
	for _, er := range recs {
		r, err := record.Unmarshal(er.R)
		if err != nil {
			t.Fatal(err)
		}
		if r.Kind != record.KindMeasurement {
			continue
		}
		m := r.Measurement
		if m.LogIndex != want {
			t.Fatalf("measurement record for log index %d, want %d", m.LogIndex, want)
		}
		if m.BootID != bootID || m.TemplateHashAlg != alg {
			t.Fatalf("entry %d: boot %q alg %q, want %q %q", want, m.BootID, m.TemplateHashAlg, bootID, alg)
		}
		want++
	}
	if want != uint64(n) {
		t.Fatalf("%d measurement records, want %d", want, n)
	}
}

// guest is a guest's files: its IMA list and boot id.
type guest struct {
	ima, bootID string
	boot        string
}

func newGuest(t *testing.T, list []byte, name string) *guest {
	t.Helper()
	dir := t.TempDir()
	g := &guest{ima: filepath.Join(dir, name), bootID: filepath.Join(dir, "boot_id"), boot: "b00710d0-0000-4000-8000-000000000001"}
	if err := os.WriteFile(g.ima, list, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(g.bootID, []byte(g.boot+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return g
}

// config is an agent configuration for tests: fast polls, pings and
// retries.
func (g *guest) config(t *testing.T, v *vm) Config {
	return Config{
		Transport:    transport.KindUnix,
		UnixPath:     v.sock,
		IMAPath:      g.ima,
		BootIDPath:   g.bootID,
		PollInterval: 10 * time.Millisecond,
		PingInterval: 200 * time.Millisecond,
		PingTimeout:  2 * time.Second,
		WriteTimeout: 5 * time.Second,
		BackoffMin:   5 * time.Millisecond,
		BackoffMax:   100 * time.Millisecond,
		Logger:       testLogger(t),
	}
}

// running is an agent started by start.
type running struct {
	a      *Agent
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, cfg Config) *running {
	t.Helper()
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{a: a, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels the agent and waits for Run to return.
func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok && err != nil {
			t.Errorf("agent Run: %v", err)
		}
		if ok {
			close(r.done)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not stop")
	}
}

// tap watches one agent stream: frame sizes, entries per frame and the
// number of measurement frames in flight.
type tap struct {
	net.Conn
	mu         sync.Mutex
	in         []byte
	inflight   []uint64
	maxFlight  int
	maxPayload int
	maxEntries int
	frames     int
	bad        error
}

func (c *tap) Write(p []byte) (int, error) {
	c.mu.Lock()
	if len(p) >= wire.HeaderSize && wire.Type(p[3]) == wire.TypeMeasurements {
		f, err := wire.NewReader(bytes.NewReader(p), false).Next()
		var m wire.Measurements
		if err == nil {
			err = wire.Decode(f, &m)
		}
		if err != nil && c.bad == nil {
			c.bad = fmt.Errorf("a write is not one whole frame: %w", err)
		}
		c.frames++
		c.maxPayload = max(c.maxPayload, len(f.Payload))
		c.maxEntries = max(c.maxEntries, len(m.Entries))
		c.inflight = append(c.inflight, m.Seq)
		c.maxFlight = max(c.maxFlight, len(c.inflight))
	}
	c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *tap) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.in = append(c.in, p[:n]...)
	for len(c.in) >= wire.HeaderSize {
		total := wire.HeaderSize + int(binary.BigEndian.Uint32(c.in[4:8])) + wire.TrailerLen
		if len(c.in) < total {
			break
		}
		if wire.Type(c.in[3]) == wire.TypeAck {
			f, _ := wire.NewReader(bytes.NewReader(c.in[:total]), false).Next()
			var a wire.Ack
			if wire.Decode(f, &a) == nil {
				for i, s := range c.inflight {
					if s == a.Seq {
						c.inflight = c.inflight[i+1:]
						break
					}
				}
			}
		}
		c.in = c.in[total:]
	}
	return n, err
}

var _ io.ReadWriteCloser = (*tap)(nil)
