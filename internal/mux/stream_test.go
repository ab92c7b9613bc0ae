package mux_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// TestStreamEvidence: streamed evidence is byte for byte the canonical
// encoding of the evidence (it re-encodes to itself), holds exactly the
// batches EvidenceSince gives, verifies, full and incremental, and comes
// in pieces of at most the chunk size.
func TestStreamEvidence(t *testing.T) {
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{MaxBatch: 50})
	a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x71, 1}, Name: "vm-a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x71, 2}, Name: "vm-b"})
	if err != nil {
		t.Fatal(err)
	}
	add := func(n int) {
		for i := range n {
			for _, id := range []*[32]byte{(*[32]byte)(ptr(a.ID())), (*[32]byte)(ptr(b.ID()))} {
				r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: fmt.Sprint(i)}}
				if _, err := m.Submit(*id, r, r, r); err != nil {
					t.Fatal(err)
				}
			}
		}
		if _, err := m.Append(ctx, a.ID(), &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log"}}); err != nil {
			t.Fatal(err)
		}
	}
	add(200)
	stream := func(t *testing.T, nonce []byte, since *evidence.Since, chunk int) []byte {
		var out []byte
		lasts := 0
		err := m.StreamEvidence(ctx, a.ID(), nonce, since, chunk, func(p []byte, last bool) error {
			if len(p) > chunk || len(p) == 0 {
				t.Fatalf("piece of %d bytes, chunk %d", len(p), chunk)
			}
			if lasts > 0 {
				t.Fatal("a piece after the last")
			}
			if last {
				lasts++
			}
			out = append(out, p...)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if lasts != 1 {
			t.Fatalf("%d last pieces", lasts)
		}
		return out
	}
	var cp *verify.Checkpoint
	for i, tt := range []struct {
		chunk       int
		incremental bool
	}{{1 << 10, false}, {64 << 10, false}, {4 << 20, false}, {1 << 10, true}, {4 << 20, true}} {
		t.Run(fmt.Sprintf("chunk %d incremental %v", tt.chunk, tt.incremental), func(t *testing.T) {
			var since *evidence.Since
			opts := verify.Options{Identity: a, AK: m.AK(), PCR: 13}
			if tt.incremental {
				since, opts.Checkpoint = cp.Since(), cp
			}
			nonce := append([]byte{byte(i)}, "a nonce of the verifier"...)
			raw := stream(t, nonce, since, tt.chunk)
			ev, err := evidence.Decode(raw)
			if err != nil {
				t.Fatal(err)
			}
			again, err := ev.MarshalBinary()
			if err != nil || !bytes.Equal(again, raw) {
				t.Fatalf("streamed evidence does not re-encode to itself (%v)", err)
			}
			ref, err := m.EvidenceSince(ctx, a.ID(), []byte("ref"), since)
			if err != nil {
				t.Fatal(err)
			}
			same := func(x, y any) bool {
				bx, _ := json.Marshal(x)
				by, _ := json.Marshal(y)
				return bytes.Equal(bx, by)
			}
			if !same(ev.Log, ref.Log) || !same(ev.Records, ref.Records) || len(ev.Log) < 2 {
				t.Fatalf("streamed log of %d batches and %d records differs from EvidenceSince's %d and %d", len(ev.Log), len(ev.Records), len(ref.Log), len(ref.Records))
			}
			// Byte for byte what MarshalBinary gives for the same evidence
			// (the reference with the streamed request's quote).
			ref.Quote, ref.PCRValues, ref.Batched = ev.Quote, ev.PCRValues, ev.Batched
			if enc, err := ref.MarshalBinary(); err != nil || !bytes.Equal(enc, raw) {
				t.Fatalf("streamed evidence is not MarshalBinary's encoding (%v)", err)
			}
			opts.Nonce = nonce
			rep, err := verify.Verify(ev, opts)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.incremental {
				cp = rep.Checkpoint
				add(30) // the next incremental case has a delta
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

// TestStreamFinalEvidence: the post-mortem evidence streamed is byte for
// byte FinalEvidence's encoding (its quote was kept, so both are fixed).
func TestStreamFinalEvidence(t *testing.T) {
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{MaxBatch: 7})
	a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x75, 1}, Name: "vm-a"})
	if err != nil {
		t.Fatal(err)
	}
	r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log"}}
	for range 40 {
		if _, err := m.Submit(a.ID(), r, r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := m.Teardown(ctx, a.ID(), "destroyed"); err != nil {
		t.Fatal(err)
	}
	var fe *evidence.Evidence
	for i := 0; ; i++ {
		if fe, err = m.FinalEvidence(a.ID()); err == nil {
			break
		}
		if i == 100 {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	want, err := fe.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	if err := m.StreamFinalEvidence(ctx, a.ID(), 300, func(p []byte, last bool) error {
		got = append(got, p...)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || len(fe.Log) < 5 {
		t.Fatalf("streamed post-mortem evidence (%d bytes) differs from FinalEvidence's (%d bytes, %d batches)", len(got), len(want), len(fe.Log))
	}
}

// TestEvidenceBudget: builds of evidence as a value (WithEvidence) hold
// their share of the evidence budget while the caller uses them, so a log
// larger than the budget is built by one request at a time; with room for
// all, they run together.
func TestEvidenceBudget(t *testing.T) {
	for _, tt := range []struct {
		name   string
		budget int64
		want   int32
	}{{"log larger than the budget", 64, 1}, {"room for all", 1 << 40, 4}} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			m := muxtest.Open(t, mux.Config{})
			m.SetEvidenceBudget(tt.budget)
			a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x74}, Name: "vm-a"})
			if err != nil {
				t.Fatal(err)
			}
			r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log"}}
			if _, err := m.Append(ctx, a.ID(), r); err != nil {
				t.Fatal(err)
			}
			var cur, peak atomic.Int32
			var wg sync.WaitGroup
			for i := range 4 {
				wg.Go(func() {
					err := m.WithEvidence(ctx, a.ID(), []byte{byte(i + 1)}, nil, func(*evidence.Evidence) error {
						n := cur.Add(1)
						for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
						}
						time.Sleep(250 * time.Millisecond)
						cur.Add(-1)
						return nil
					})
					if err != nil {
						t.Error(err)
					}
				})
			}
			wg.Wait()
			if peak.Load() != tt.want {
				t.Fatalf("%d builds at once, want %d", peak.Load(), tt.want)
			}
		})
	}
}
