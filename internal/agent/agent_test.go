package agent

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/wire"
)

func TestConfigDefaults(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		alg     string
		kind    transport.Kind
		errText string
	}{
		{"zero is vsock and sha1", Config{}, "sha1", transport.KindVsock, ""},
		{"per-bank sha256 list", Config{IMAPath: "/sys/kernel/security/ima/binary_runtime_measurements_sha256"}, "sha256", transport.KindVsock, ""},
		{"explicit algorithm wins", Config{IMAPath: "/x_sha256", TemplateHashAlg: "sha1"}, "sha1", transport.KindVsock, ""},
		{"serial", Config{Transport: transport.KindSerial}, "sha1", transport.KindSerial, ""},
		{"unix needs a path", Config{Transport: transport.KindUnix}, "", "", "socket path"},
		{"unknown transport", Config{Transport: "tcp"}, "", "", "unknown transport"},
		{"unknown algorithm", Config{TemplateHashAlg: "sha384"}, "", "", "sha384"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := New(tt.cfg)
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c := a.Config()
			if c.TemplateHashAlg != tt.alg || c.Transport != tt.kind {
				t.Fatalf("alg %q transport %q, want %q %q", c.TemplateHashAlg, c.Transport, tt.alg, tt.kind)
			}
			if c.PollInterval != time.Second || c.PingInterval != 10*time.Second || c.PingTimeout != 30*time.Second ||
				c.MaxEntriesPerFrame != wire.MaxEntries || c.IMAPath == "" || c.BootIDPath != DefaultBootIDPath {
				t.Fatalf("defaults not applied: %+v", c)
			}
		})
	}
}

// TestSourceSeek moves the resume point around a list read incrementally
// and checks that every position yields the right entry, re-reading from
// a checkpoint rather than from the start.
func TestSourceSeek(t *testing.T) {
	list := readRealList(t)
	want, err := ima.ParseList(list)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		list []byte
		alg  string
	}{
		{"sha1", list, "sha1"},
		{"sha256", sha256List(t, list), "sha256"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "list")
			bounds := entryBounds(t, tt.list, map[string]int{"sha1": 20, "sha256": 32}[tt.alg])
			// Start with part of the list, cut inside entry 300.
			cut := bounds[300] + 17
			if err := os.WriteFile(path, tt.list[:cut], 0o644); err != nil {
				t.Fatal(err)
			}
			s, err := openSource(path, tt.alg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.close()
			n, err := s.scan()
			if err != nil || n != 300 {
				t.Fatalf("scan: %d entries, %v; want 300", n, err)
			}
			if len(s.checkpoints) != 2 || s.checkpoints[1] != int64(bounds[checkpointEvery]) {
				t.Fatalf("checkpoints %v, want [0 %d]", s.checkpoints, bounds[checkpointEvery])
			}
			check := func(idx uint64) {
				t.Helper()
				e, ok, err := s.next()
				if err != nil || !ok {
					t.Fatalf("entry %d: ok %v err %v", idx, ok, err)
				}
				w := want[idx]
				if e.TemplateName != w.TemplateName || !bytes.Equal(e.TemplateData, w.TemplateData) || len(e.TemplateHash) != len(tt.list[4:4+len(e.TemplateHash)]) {
					t.Fatalf("entry %d differs", idx)
				}
				s.take()
			}
			for _, idx := range []uint64{0, 299, 5, 256, 255, 257, 10} {
				if err := s.seek(idx); err != nil {
					t.Fatal(err)
				}
				check(idx)
			}
			// Past the end: nothing yet; then the list grows.
			if err := s.seek(450); err != nil {
				t.Fatal(err)
			}
			if _, ok, err := s.next(); ok || err != nil {
				t.Fatalf("entry 450 of a 300-entry list: ok %v err %v", ok, err)
			}
			f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(tt.list[cut:])
			f.Close()
			for idx := uint64(450); idx < realEntries; idx++ {
				check(idx)
			}
			if _, ok, _ := s.next(); ok {
				t.Fatal("an entry after the last")
			}
			if s.known != realEntries {
				t.Fatalf("known %d", s.known)
			}
			// A frame respects both bounds.
			s.seek(0)
			m, ok, err := s.frame(1000, 4096)
			if err != nil || !ok || m.First != 0 {
				t.Fatal(m, ok, err)
			}
			size := 0
			for _, e := range m.Entries {
				size += len(e.Data) + len(e.TemplateHash) + len(e.Template) + entryOverhead
				if e.HashAlg != tt.alg {
					t.Fatalf("hash alg %q", e.HashAlg)
				}
			}
			if size > 4096 || len(m.Entries) < 2 {
				t.Fatalf("frame of %d entries, ~%d bytes", len(m.Entries), size)
			}
			m2, _, _ := s.frame(3, 1<<20)
			if m2.First != uint64(len(m.Entries)) || len(m2.Entries) != 3 {
				t.Fatalf("second frame first %d with %d entries", m2.First, len(m2.Entries))
			}
		})
	}
}

// TestStreamRealList streams the real guest list to a real bridge over a
// unix socket; the VM's evidence then verifies with exactly its 454
// entries. It checks the flow control on the wire as well.
func TestStreamRealList(t *testing.T) {
	r := newRig(t)
	list := readRealList(t)
	for _, tt := range []struct {
		name       string
		file       string
		list       []byte
		alg        string
		maxEntries int
	}{
		{"sha1 list", "binary_runtime_measurements", list, "sha1", 0},
		{"sha1 list, small frames", "binary_runtime_measurements", list, "sha1", 16},
		{"per-bank sha256 list", "binary_runtime_measurements_sha256", sha256List(t, list), "sha256", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			v := r.newVM(strings.ReplaceAll(tt.name, " ", "-"))
			g := newGuest(t, tt.list, tt.file)
			cfg := g.config(t, v)
			cfg.MaxEntriesPerFrame = tt.maxEntries
			var taps []*tap
			var mu sync.Mutex
			cfg.Dial = func(ctx context.Context) (Stream, error) {
				c, err := transport.DialUnix(ctx, v.sock)
				if err != nil {
					return nil, err
				}
				tc := &tap{Conn: c}
				mu.Lock()
				taps = append(taps, tc)
				mu.Unlock()
				return tc, nil
			}
			start(t, cfg)
			v.waitNext(realEntries, 20*time.Second)
			v.verified(realEntries, g.boot, tt.alg)

			mu.Lock()
			defer mu.Unlock()
			if len(taps) != 1 {
				t.Fatalf("%d connections, want 1", len(taps))
			}
			tc := taps[0]
			tc.mu.Lock()
			defer tc.mu.Unlock()
			if tc.bad != nil {
				t.Fatal(tc.bad)
			}
			t.Logf("%d frames, largest payload %d bytes, most entries %d, most in flight %d", tc.frames, tc.maxPayload, tc.maxEntries, tc.maxFlight)
			if tc.maxPayload > wire.PreferredPayload {
				t.Errorf("payload of %d bytes, over wire.PreferredPayload", tc.maxPayload)
			}
			if tc.maxFlight > bridge.Window {
				t.Errorf("%d frames in flight, over the window of %d", tc.maxFlight, bridge.Window)
			}
			if tt.maxEntries > 0 && tc.maxEntries > tt.maxEntries {
				t.Errorf("frame of %d entries, over %d", tc.maxEntries, tt.maxEntries)
			}
			if tt.maxEntries == 16 && tc.maxFlight < 2 {
				t.Errorf("never more than %d frame in flight: no pipelining", tc.maxFlight)
			}
		})
	}
}

// grow writes list to path in random chunks (cutting entries in the
// middle, and at least once 7 bytes into an entry header) with pauses, the
// way the kernel appends to the list while the agent reads it.
func grow(t *testing.T, path string, list []byte, seed uint64, pause time.Duration) <-chan struct{} {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	bounds := entryBounds(t, list, 20)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer f.Close()
		rng := rand.New(rand.NewPCG(seed, seed))
		cuts := map[int]bool{bounds[100] + 7: true, bounds[101] + 1: true}
		for off := 0; off < len(list); {
			n := min(1+rng.IntN(1500), len(list)-off)
			for c := range cuts {
				if off < c && c < off+n {
					n = c - off
				}
			}
			if _, err := f.Write(list[off : off+n]); err != nil {
				t.Error(err)
				return
			}
			off += n
			time.Sleep(pause)
		}
	}()
	return done
}

// TestGrowingList: the list grows while the agent streams, in chunks that
// end inside entries; the bridge ends with every entry once.
func TestGrowingList(t *testing.T) {
	r := newRig(t)
	v := r.newVM("growing")
	list := readRealList(t)
	g := newGuest(t, nil, "binary_runtime_measurements")
	written := grow(t, g.ima, list, 1, 3*time.Millisecond)
	start(t, g.config(t, v))
	<-written
	v.waitNext(realEntries, 20*time.Second)
	v.verified(realEntries, g.boot, "sha1")
}

// breakable is an agent stream that the test can break in the middle of
// the next frame it writes.
type breakable struct {
	net.Conn
	armed atomic.Bool
}

func (c *breakable) Write(p []byte) (int, error) {
	if c.armed.Load() && len(p) > 8 {
		n, _ := c.Conn.Write(p[:len(p)/2])
		c.Conn.Close()
		return n, errors.New("test: connection broken mid-frame")
	}
	return c.Conn.Write(p)
}

// TestDisruptions breaks the stream again and again while the list grows:
// the agent restarts, the bridge drops the connection, the connection
// breaks in the middle of a frame. Each time the agent says hello again and
// the bridge's resume point decides: every entry ends up in the VM's
// evidence exactly once, in order.
func TestDisruptions(t *testing.T) {
	r := newRig(t)
	tests := []struct {
		name    string
		disrupt func(t *testing.T, v *vm, cur **running, cfg Config, conns func() []*breakable) bool
	}{
		{"agent restart", func(t *testing.T, v *vm, cur **running, cfg Config, _ func() []*breakable) bool {
			(*cur).stop(t)
			*cur = start(t, cfg)
			return true
		}},
		{"bridge drops the connection", func(t *testing.T, v *vm, _ **running, _ Config, _ func() []*breakable) bool {
			return v.dropConns() > 0
		}},
		{"connection breaks mid-frame", func(t *testing.T, v *vm, _ **running, _ Config, conns func() []*breakable) bool {
			cs := conns()
			if len(cs) == 0 {
				return false
			}
			cs[len(cs)-1].armed.Store(true)
			return true
		}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := r.newVM("disrupt-" + strings.ReplaceAll(tt.name, " ", "-"))
			g := newGuest(t, nil, "binary_runtime_measurements")
			cfg := g.config(t, v)
			cfg.MaxEntriesPerFrame = 8
			var mu sync.Mutex
			var conns []*breakable
			cfg.Dial = func(ctx context.Context) (Stream, error) {
				c, err := transport.DialUnix(ctx, v.sock)
				if err != nil {
					return nil, err
				}
				b := &breakable{Conn: c}
				mu.Lock()
				conns = append(conns, b)
				mu.Unlock()
				return b, nil
			}
			list := func() []*breakable { mu.Lock(); defer mu.Unlock(); return append([]*breakable(nil), conns...) }
			written := grow(t, g.ima, readRealList(t), uint64(i+10), 4*time.Millisecond)
			cur := start(t, cfg)
			hits := 0
			for done := false; !done; {
				select {
				case <-written:
					done = true
				case <-time.After(60 * time.Millisecond):
					if n := v.next(); n > 0 && n < realEntries && tt.disrupt(t, v, &cur, cfg, list) {
						hits++
					}
				}
			}
			v.waitNext(realEntries, 30*time.Second)
			t.Logf("%d disruptions mid-stream, %d connections", hits, len(list()))
			if hits < 3 {
				t.Errorf("only %d disruptions hit the stream", hits)
			}
			v.verified(realEntries, g.boot, "sha1")
		})
	}
}

// TestEndedStops: when the bridge says the VM instance ended, Run stops
// with ErrEnded instead of retrying.
func TestEndedStops(t *testing.T) {
	r := newRig(t)
	v := r.newVM("ended")
	g := newGuest(t, readRealList(t), "binary_runtime_measurements")
	a, err := New(g.config(t, v))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(context.Background()) }()
	v.waitNext(realEntries, 20*time.Second)
	if _, err := r.b.Mux.Teardown(context.Background(), v.id, "test"); err != nil {
		t.Fatal(err)
	}
	v.dropConns() // the daemon closes the listener's connections at teardown
	select {
	case err := <-done:
		if !errors.Is(err, ErrEnded) {
			t.Fatalf("Run: %v, want ErrEnded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not stop after the VM ended")
	}
}
