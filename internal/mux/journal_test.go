package mux_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/hwprofile"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// ext is the extend of PCR 8 with digest b,0,0,…; its Seq is 2+b (after
// the vTPM's Init and Startup).
func ext(b byte) vpcr.Event {
	d := make([]byte, 32)
	d[0] = b
	return vpcr.Event{Seq: 2 + uint64(b), Kind: vpcr.KindExtend, Command: 0x182, PCR: 8, Digests: []vpcr.Digest{{Alg: vpcr.SHA256, Value: d}}}
}

// appendAsync runs j.Append and reports when it returned.
func appendAsync(j *mux.Journal, e vpcr.Event) chan error {
	done := make(chan error, 1)
	go func() { done <- j.Append(context.Background(), e) }()
	return done
}

func returnsWithin(ch chan error, d time.Duration) (error, bool) {
	select {
	case err := <-ch:
		return err, true
	case <-time.After(d):
		return nil, false
	}
}

// TestJournalModes: a vTPM event's Append returns once the record is
// durable (mode durable) or durable and extended (mode anchored); an event
// that was not recorded is an error; one whose extend failed after it was
// durable is recorded exactly once, and in mode anchored Append waits
// until the multiplexer healed.
func TestJournalModes(t *testing.T) {
	r := newRig(t, mux.Config{})
	a, err := r.m.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x70}, Name: "vm-a", VTPMBanks: []uint16{uint16(vpcr.SHA256)}})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Command: 0x144, Banks: []vpcr.Alg{vpcr.SHA256}}} {
		if err := r.m.Journal(a.ID(), false).Append(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	hold := make(chan struct{})
	r.tpm.hold.Store(&hold)

	// Durable: returns while the extend is held.
	if err, ok := returnsWithin(appendAsync(r.m.Journal(a.ID(), false), ext(1)), 5*time.Second); !ok || err != nil {
		t.Fatalf("durable append with the extend held: returned %v, err %v", ok, err)
	}
	// Anchored: does not return until the extend happens.
	done := appendAsync(r.m.Journal(a.ID(), true), ext(2))
	if _, ok := returnsWithin(done, 300*time.Millisecond); ok {
		t.Fatal("anchored append returned before its extend")
	}
	r.tpm.hold.Store(nil)
	close(hold)
	if err, ok := returnsWithin(done, 5*time.Second); !ok || err != nil {
		t.Fatalf("anchored append after the extend: returned %v, err %v", ok, err)
	}

	// The extend fails after the batch is durable: recorded once; anchored
	// waits for the heal.
	r.tpm.failAfter.Store(1)
	done = appendAsync(r.m.Journal(a.ID(), true), ext(3))
	if _, ok := returnsWithin(done, 300*time.Millisecond); ok {
		t.Fatal("anchored append returned while the multiplexer is faulted")
	}
	r.tpm.down.Store(false)
	if err, ok := returnsWithin(done, 10*time.Second); !ok || err != nil {
		t.Fatalf("anchored append after the heal: returned %v, err %v", ok, err)
	}
	evs, err := r.m.TPMEvents(a.ID())
	if err != nil {
		t.Fatal(err)
	}
	evs = evs[2:]
	if len(evs) != 3 || evs[0].Digests[0].Value[0] != 1 || evs[1].Digests[0].Value[0] != 2 || evs[2].Digests[0].Value[0] != 3 {
		t.Fatalf("journal holds %v, want the three events once each, in order", evs)
	}
	if n := r.verified(a); n != 6 {
		t.Fatalf("%d records, want genesis, init, startup and three extends", n)
	}

	// Not recorded: the VM has ended.
	if _, err := r.m.Teardown(context.Background(), a.ID(), "destroyed"); err != nil {
		t.Fatal(err)
	}
	err = r.m.Journal(a.ID(), false).Append(context.Background(), ext(4))
	if !errors.Is(err, mux.ErrEnded) && !errors.Is(err, mux.ErrUnknownVM) {
		t.Fatalf("append after teardown: %v", err)
	}
	if evs, _ := r.m.TPMEvents(a.ID()); len(evs) != 5 {
		t.Fatalf("a refused event was recorded: %d events", len(evs))
	}
}

// TestJournalNotHeldForTheSlot: with activity concealment on (a slotted
// commit every Interval), a vTPM event is committed at once, not at the
// next slot: a guest kernel waits on each of its extends.
func TestJournalNotHeldForTheSlot(t *testing.T) {
	r := newRig(t, mux.Config{Cover: mux.Cover{Pad: 16, Interval: 2 * time.Second}})
	a, err := r.m.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x71}, Name: "vm-a", VTPMBanks: []uint16{uint16(vpcr.SHA256)}})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, e := range []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Command: 0x144, Banks: []vpcr.Alg{vpcr.SHA256}}, ext(1), ext(2)} {
		if err := r.m.Journal(a.ID(), true).Append(context.Background(), e); err != nil {
			t.Fatal(err)
		}
	}
	if el := time.Since(start); el > 1500*time.Millisecond {
		t.Fatalf("four vTPM events took %v with a 2 s slot: they waited for slots", el)
	}
}

// TestJournalGather: anchored guests that an extend answered come back
// with their next events at once, and the committer holds the next batch
// for them rather than cutting it at the first one: with 10 closed-loop
// anchored guests on a TPM whose extend takes 3 ms, each round of events
// is one batch (without the gather about every other guest missed its
// round's batch, about two batches a round and two extends a command).
func TestJournalGather(t *testing.T) {
	ctx := context.Background()
	real, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer real.Close()
	tp := hwprofile.Wrap(real, hwprofile.Profile{Extend: 3 * time.Millisecond})
	st, err := logstore.Open(filepath.Join(t.TempDir(), "log.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, mux.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const guests, rounds = 10, 30
	js := make([]*mux.Journal, guests)
	for i := range js {
		id, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x71, byte(i)}, Name: fmt.Sprintf("vm-%d", i), VTPMBanks: []uint16{uint16(vpcr.SHA256)}})
		if err != nil {
			t.Fatal(err)
		}
		js[i] = m.Journal(id.ID(), true)
	}
	before := m.Status().Batches
	var wg sync.WaitGroup
	for _, j := range js {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range rounds {
				if err := j.Append(ctx, ext(byte(k))); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	batches := m.Status().Batches - before
	t.Logf("%d anchored guests × %d events: %d batches", guests, rounds, batches)
	if batches > rounds*3/2 {
		t.Errorf("%d batches for %d rounds of %d guests: the committer cut batches before the answered guests came back (want at most %d)", batches, rounds, guests, rounds*3/2)
	}
}

// TestAckNotHeldByTheApplier: an acknowledgement waits for its batch to be
// in bbolt, and the applier, which otherwise waits between transactions
// (here 200 ms), writes it at once, even when a batch nobody waits for (a
// concealment heartbeat) was applied just before: 20 rounds of heartbeat,
// record, acknowledgement take well under one applier interval each.
func TestAckNotHeldByTheApplier(t *testing.T) {
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{Cover: mux.Cover{Pad: 4, Interval: time.Hour}, ApplyEvery: 200 * time.Millisecond})
	a := newVMBatched(t, m, mux.Launch{UUID: [16]byte{0x73, 1}, Name: "vm-a"})
	r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: "x"}}
	var slowest time.Duration
	for range 20 {
		before, _ := m.CoverStats()
		m.TriggerSlot()
		for n := before; n == before; n, _ = m.CoverStats() {
			time.Sleep(100 * time.Microsecond)
		}
		start := time.Now()
		tk, err := m.Submit(a.ID(), r)
		if err != nil {
			t.Fatal(err)
		}
		m.TriggerSlot()
		if _, err := tk.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		slowest = max(slowest, time.Since(start))
	}
	t.Logf("slowest acknowledgement %v", slowest)
	if slowest > 60*time.Millisecond {
		t.Errorf("an acknowledgement took %v: held for the applier's interval", slowest)
	}
}
