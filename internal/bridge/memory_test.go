package bridge

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// peakRSS returns the process's peak resident set size (VmHWM) in bytes.
func peakRSS(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if f := bytes.Fields(l); len(f) >= 2 && string(f[0]) == "VmHWM:" {
			kb, _ := strconv.ParseInt(string(f[1]), 10, 64)
			return kb << 10
		}
	}
	t.Skip("no VmHWM")
	return 0
}

// resetPeakRSS frees what the garbage collector can and resets VmHWM to
// the current RSS (clear_refs 5, Linux ≥ 4.0).
func resetPeakRSS(t *testing.T) int64 {
	t.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		t.Skipf("cannot reset the peak RSS: %v", err)
	}
	return peakRSS(t)
}

// fullEvidence asks for VM id's full evidence over a guest connection and
// reads the parts without keeping them (a verifier in its own process),
// returning the bytes received.
func fullEvidence(ctx context.Context, b *Bridge, id conceal.Digest, nonce []byte) (int, error) {
	a, h := net.Pipe()
	defer a.Close()
	go b.Serve(ctx, id, h, false)
	c := wire.NewConn(a, false)
	if err := c.Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: 1, Nonce: nonce}); err != nil {
		return 0, err
	}
	n := 0
	for {
		f, err := c.Recv()
		if err != nil {
			return n, err
		}
		var r wire.EvidenceResponse
		if err := wire.Decode(f, &r); err != nil {
			return n, fmt.Errorf("%s frame: %w", f.Type, err)
		}
		n += len(r.Evidence)
		if !r.More {
			return n, nil
		}
	}
}

// copiedEvidence is the evidence path before streaming: build the whole
// evidence, serialize it, encode every frame (to nowhere).
func copiedEvidence(ctx context.Context, m *mux.Mux, id conceal.Digest, nonce []byte) (int, error) {
	ev, err := m.EvidenceSince(ctx, id, nonce, nil)
	if err != nil {
		return 0, err
	}
	raw, err := ev.MarshalBinary()
	if err != nil {
		return 0, err
	}
	for _, p := range wire.EvidenceParts(&wire.EvidenceResponse{ID: 1, Evidence: raw}, 4<<20) {
		if _, err := wire.Encode(wire.TypeEvidenceResponse, p); err != nil {
			return 0, err
		}
	}
	return len(raw), nil
}

// TestEvidenceMemoryBounded: 4 verifiers ask at once for full evidence of a
// 750k-entry log over the guest channel. Streamed from the store (the
// bridge's path) the process's peak RSS stays under 256 MB; the baseline,
// measured in the same run, is the path before streaming: each request
// builds the whole evidence, serializes it and encodes its frames, all four
// at once.
func TestEvidenceMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a 750k-entry log")
	}
	entries := 750_000
	if s := os.Getenv("TPMMUX_MEM_ENTRIES"); s != "" {
		entries, _ = strconv.Atoi(s)
	}
	verifiers := 4
	if s := os.Getenv("TPMMUX_MEM_VERIFIERS"); s != "" {
		verifiers, _ = strconv.Atoi(s)
	}
	run := func(t *testing.T, budget int64, copying bool) (peak, rest int64, got int) {
		m := muxtest.Open(t, mux.Config{})
		m.SetEvidenceBudget(budget)
		b := &Bridge{Mux: m}
		ctx := context.Background()
		a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x70, 1}, Name: "vm-a"})
		if err != nil {
			t.Fatal(err)
		}
		bi, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x70, 2}, Name: "vm-b"})
		if err != nil {
			t.Fatal(err)
		}
		r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: "filler"}}
		chunk := make([]*record.Record, 8192)
		for i := range chunk {
			chunk[i] = r
		}
		var last *mux.Ticket
		for n := 0; n < entries; n += len(chunk) {
			if last, err = m.Submit(bi.ID(), chunk[:min(len(chunk), entries-n)]...); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := last.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		rest = resetPeakRSS(t)
		var wg sync.WaitGroup
		sizes := make([]int, verifiers)
		errs := make([]error, verifiers)
		for i := range verifiers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if copying {
					sizes[i], errs[i] = copiedEvidence(ctx, m, a.ID(), []byte{byte(i + 1)})
					return
				}
				sizes[i], errs[i] = fullEvidence(ctx, b, a.ID(), []byte{byte(i + 1)})
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("verifier %d: %v", i, err)
			}
		}
		return peakRSS(t), rest, sizes[0]
	}
	var bp, br, up, ur int64
	var size int
	t.Run("streamed", func(t *testing.T) { bp, br, size = run(t, 0, false) })
	t.Run("copied", func(t *testing.T) { up, ur, _ = run(t, math.MaxInt64, true) })
	mb := func(n int64) string { return fmt.Sprintf("%.0f MB", float64(n)/1e6) }
	t.Logf("%d verifiers, full evidence of a %d-entry log (%s each): peak RSS %s over a resting %s streamed; %s over %s built and copied whole as before (%.1f× the growth)",
		verifiers, entries, mb(int64(size)), mb(bp), mb(br), mb(up), mb(ur), float64(up-ur)/float64(max(bp-br, 1)))
	if size < entries*64 {
		t.Fatalf("evidence of %d bytes cannot hold %d entries", size, entries)
	}
	if bp > 256e6 {
		t.Fatalf("peak RSS %s with the evidence budget, want ≤ 256 MB", mb(bp))
	}
}
