package mux_test

import (
	"context"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// slotted runs fn while kicking the committer's slots, for a mux with
// Cover on and an Interval longer than the test (so that slots happen only
// when the test says).
func slotted(t *testing.T, m *mux.Mux, fn func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			return
		case <-time.After(time.Millisecond):
			m.TriggerSlot()
		}
	}
}

// newVMBatched starts a VM on m, a mux with Cover on, and kicks slots
// until its genesis is batched: NewVM returns once the genesis is durable,
// and the next slot batches it.
func newVMBatched(t *testing.T, m *mux.Mux, l mux.Launch) *conceal.Identity {
	t.Helper()
	id, err := m.NewVM(context.Background(), l)
	if err != nil {
		t.Fatal(err)
	}
	// A reader of the VM waits for the slot that batches its genesis.
	slotted(t, m, func() error { _, err := m.Info(id.ID()); return err })
	return id
}

// seededRand is a ChaCha8 stream the test can restart, so that the rounds
// draw the same stream however many heartbeats the set-up took.
type seededRand struct {
	mu sync.Mutex
	r  *rand.ChaCha8
}

func (s *seededRand) Read(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.r.Read(p)
}

func (s *seededRand) seed(v byte) {
	var k [32]byte
	k[0] = v
	s.mu.Lock()
	s.r = rand.NewChaCha8(k)
	s.mu.Unlock()
}

// observables are what A's verifier sees of the others: the log's length,
// the batch sizes, and where A's records sit in their batches.
type observables struct {
	logLen  uint64
	sizes   []int
	offsets [][]int // per round, the in-batch offsets of A's records
}

// coverRun is one host: VMs A and B, rounds slots; in each A submits 2
// records and B k, then one slot commits. Every fourth round nobody
// submits (a heartbeat). A's evidence is verified and its observables
// returned.
func coverRun(t *testing.T, cover mux.Cover, seed byte, k, rounds int) observables {
	t.Helper()
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{Cover: cover})
	a := newVMBatched(t, m, mux.Launch{UUID: [16]byte{0x72, 1}, Name: "vm-a"})
	b := newVMBatched(t, m, mux.Launch{UUID: [16]byte{0x72, 2}, Name: "vm-b"})
	// Let a kick left from the set-up be consumed before the rounds.
	time.Sleep(20 * time.Millisecond)
	if sr, ok := cover.Rand.(*seededRand); ok {
		sr.seed(seed)
	}
	r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: "x"}}
	var firstBatch uint64
	for round := range rounds {
		if round%4 == 3 {
			if cover.Pad == 0 {
				continue
			}
			before, _ := m.CoverStats()
			m.TriggerSlot()
			for n := before; n == before; n, _ = m.CoverStats() {
				time.Sleep(100 * time.Microsecond)
			}
			continue
		}
		ta, err := m.Submit(a.ID(), r, r)
		if err != nil {
			t.Fatal(err)
		}
		var tb *mux.Ticket
		if k > 0 {
			bs := make([]*record.Record, k)
			for i := range bs {
				bs[i] = r
			}
			if tb, err = m.Submit(b.ID(), bs...); err != nil {
				t.Fatal(err)
			}
		}
		m.TriggerSlot()
		ack, err := ta.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if tb != nil {
			if _, err := tb.Wait(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if round == 0 {
			firstBatch = ack.Batch
		}
	}
	nonce := []byte("cover: a nonce of the verifier")
	ev, err := m.Evidence(ctx, a.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if ev, err = evidence.Decode(raw); err != nil {
		t.Fatal(err)
	}
	// The verifier is unchanged: cover leaves are simply not A's tags.
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: a, AK: m.AK(), PCR: 13})
	if err != nil {
		t.Fatalf("A's evidence with cover leaves does not verify: %v", err)
	}
	if want := 2 * (rounds - rounds/4); rep.Counts.Actions != want {
		t.Fatalf("%d of A's records verified, want %d", rep.Counts.Actions, want)
	}
	// The observables from the first round on (the set-up's heartbeats
	// depend on how long it took, not on B).
	var o observables
	starts := map[uint64]uint64{} // batch start of each global index's batch
	var from uint64
	for bi, bt := range ev.Log {
		n := uint64(bt.Entries.Len())
		if bt.G0 == 0 {
			n++ // the epoch record's leaf
		}
		if uint64(bi) == firstBatch {
			from = bt.G0
		}
		o.logLen = bt.G0 + n - from
		if uint64(bi) >= firstBatch {
			o.sizes = append(o.sizes, int(n))
		}
		for g := bt.G0; g < bt.G0+n; g++ {
			starts[g] = bt.G0
		}
	}
	var cur []int
	var curStart uint64
	for _, rec := range ev.Records[1:] { // after the genesis
		if rec.G < from {
			t.Fatalf("A's record at %d before the first round's batch at %d", rec.G, from)
		}
		s := starts[rec.G]
		if cur != nil && s != curStart {
			o.offsets = append(o.offsets, cur)
			cur = nil
		}
		curStart = s
		cur = append(cur, int(rec.G-s))
	}
	o.offsets = append(o.offsets, cur)
	return o
}

// chiSquare is the two-sample chi-square statistic of homogeneity of
// counts a and b over the same bins, and its degrees of freedom.
func chiSquare(a, b []int) (float64, int) {
	na, nb := 0, 0
	for i := range a {
		na, nb = na+a[i], nb+b[i]
	}
	x, df := 0.0, -1
	for i := range a {
		tot := a[i] + b[i]
		if tot == 0 {
			continue
		}
		df++
		ea := float64(na) * float64(tot) / float64(na+nb)
		eb := float64(nb) * float64(tot) / float64(na+nb)
		x += (float64(a[i])-ea)*(float64(a[i])-ea)/ea + (float64(b[i])-eb)*(float64(b[i])-eb)/eb
	}
	return x, df
}

// chi2Crit001 are the chi-square critical values at significance 0.001
// for 1..15 degrees of freedom.
var chi2Crit001 = []float64{0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70}

// TestCoverConcealsActivity: with cover leaves, what A's verifier sees
// (the log's length, every batch size, and the positions of A's records
// in their batches) comes from the same distribution whether B sent 0 or
// k records per slot within the envelope: the lengths and sizes are equal
// exactly, and a two-sample chi-square test at significance 0.001 does not
// tell A's in-batch positions apart (deterministic seeds: the verdict is
// reproducible, not a coin flip). Without cover the same observables give
// B's count away, which shows the test can see a leak.
func TestCoverConcealsActivity(t *testing.T) {
	const pad, rounds, k = 8, 400, 5 // A 2 + B 5 ≤ 8: within the envelope
	seeded := func() mux.Cover {
		sr := &seededRand{}
		sr.seed(0)
		return mux.Cover{Pad: pad, Interval: time.Hour, Rand: sr}
	}
	run := func(name string, cover mux.Cover, seed byte, k, rounds int) (o observables) {
		t.Run(name, func(t *testing.T) { o = coverRun(t, cover, seed, k, rounds) })
		return o
	}
	quiet := run("cover, B quiet", seeded(), 1, 0, rounds)
	busy := run("cover, B busy", seeded(), 2, k, rounds)
	if quiet.logLen != busy.logLen {
		t.Fatalf("log length %d when B is quiet, %d when B sends %d per slot", quiet.logLen, busy.logLen, k)
	}
	if !slices.Equal(quiet.sizes, busy.sizes) {
		t.Fatalf("batch sizes differ: %v vs %v", quiet.sizes, busy.sizes)
	}
	for _, s := range quiet.sizes {
		if s != pad {
			t.Fatalf("batch of %d leaves, want %d (sizes %v)", s, pad, quiet.sizes)
		}
	}
	if len(quiet.offsets) != len(busy.offsets) || len(quiet.offsets) != rounds-rounds/4 {
		t.Fatalf("A's records in %d and %d batches, want %d", len(quiet.offsets), len(busy.offsets), rounds-rounds/4)
	}
	for rank := range 2 {
		a, b := make([]int, pad), make([]int, pad)
		for i := range quiet.offsets {
			a[quiet.offsets[i][rank]]++
			b[busy.offsets[i][rank]]++
		}
		x, df := chiSquare(a, b)
		t.Logf("A's record %d of 2 per batch: positions %v (B quiet) vs %v (B sends %d): chi-square %.2f, df %d, critical %.2f at 0.001",
			rank+1, a, b, k, x, df, chi2Crit001[df])
		if x > chi2Crit001[df] {
			t.Fatalf("A's in-batch positions tell B's activity apart (chi-square %.2f > %.2f)", x, chi2Crit001[df])
		}
	}
	// The same observables without cover leak B's count.
	off := mux.Cover{}
	q0 := run("no cover, B quiet", off, 0, 0, 40)
	b0 := run("no cover, B busy", off, 0, k, 40)
	if q0.logLen == b0.logLen {
		t.Fatal("without cover the log length did not change with B's activity: the test cannot see a leak")
	}
	t.Logf("without cover: log length %d (B quiet) vs %d (B sends %d per round)", q0.logLen, b0.logLen, k)
}

// startObservables are what A's verifier and A's agent can see while
// another VM may start: the batch count after each step, and A's
// evidence's log length.
type startObservables struct {
	batches []uint64
	logLen  []int
}

// coverStartRun is one host with cover on and slots only when the test
// says: VM A is live and batched; then B starts (startB) or not, A's
// verifier asks for evidence twice around one slot. It returns what A
// sees, and checks that B's start needed no slot and that B's records
// are there once the slot came.
func coverStartRun(t *testing.T, startB bool) startObservables {
	t.Helper()
	ctx := context.Background()
	sr := &seededRand{}
	sr.seed(7)
	m := muxtest.Open(t, mux.Config{Cover: mux.Cover{Pad: 8, Interval: time.Hour, Rand: sr}})
	a := newVMBatched(t, m, mux.Launch{UUID: [16]byte{0x73, 1}, Name: "vm-a"})
	time.Sleep(20 * time.Millisecond) // a kick left from slotted is consumed
	var o startObservables
	see := func() {
		o.batches = append(o.batches, m.Status().Batches)
		nonce := []byte("cover start: a nonce")
		ev, err := m.Evidence(ctx, a.ID(), nonce)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: a, AK: m.AK(), PCR: 13}); err != nil {
			t.Fatalf("A's evidence: %v", err)
		}
		o.logLen = append(o.logLen, len(ev.Log))
	}
	see()
	var b *conceal.Identity
	if startB {
		// No slot comes (Interval is an hour): NewVM returns once the
		// genesis is durable.
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		var err error
		b, err = m.NewVM(sctx, mux.Launch{UUID: [16]byte{0x73, 2}, Name: "vm-b"})
		cancel()
		if err != nil {
			t.Fatalf("B's start waited for a slot: %v", err)
		}
		// B's reader waits for the slot that batches B's genesis.
		got := make(chan error, 1)
		go func() { _, err := m.Info(b.ID()); got <- err }()
		select {
		case err := <-got:
			t.Fatalf("B's state was read before any slot batched its genesis (err %v)", err)
		case <-time.After(50 * time.Millisecond):
		}
		defer func() {
			if err := <-got; err != nil {
				t.Fatalf("B's state after the slot: %v", err)
			}
		}()
	}
	see()
	before := m.Status().Batches
	m.TriggerSlot()
	for m.Status().Batches == before {
		time.Sleep(100 * time.Microsecond)
	}
	see()
	if startB {
		nonce := []byte("cover start: B's nonce")
		ev, err := m.Evidence(ctx, b.ID(), nonce)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: b, AK: m.AK(), PCR: 13})
		if err != nil {
			t.Fatalf("B's evidence: %v", err)
		}
		if rep.Records != 1 {
			t.Fatalf("B's evidence has %d records, want its genesis", rep.Records)
		}
	}
	return o
}

// TestCoverHidesVMStart: with cover on, a VM's start (NewVM) returns as
// soon as its genesis is durable, without waiting for a slot, and still
// shows nothing to another VM's verifier: the batch count and A's log are
// the same, step by step, whether B started or not. In particular A's
// evidence request does not batch B's held genesis off the schedule (a
// batch there would give B's start away); the next slot batches it.
func TestCoverHidesVMStart(t *testing.T) {
	var quiet, started startObservables
	t.Run("B does not start", func(t *testing.T) { quiet = coverStartRun(t, false) })
	t.Run("B starts", func(t *testing.T) { started = coverStartRun(t, true) })
	// From the first step on: how many heartbeats the set-up took depends
	// on the scheduler, not on B.
	for _, o := range []*startObservables{&quiet, &started} {
		for i := len(o.batches) - 1; i >= 0; i-- {
			o.batches[i] -= o.batches[0]
			o.logLen[i] -= o.logLen[0]
		}
	}
	t.Logf("new batches %v / %v, A's log grew %v / %v", quiet.batches, started.batches, quiet.logLen, started.logLen)
	if !slices.Equal(quiet.batches, started.batches) || !slices.Equal(quiet.logLen, started.logLen) {
		t.Fatalf("A sees B's start: batches %v vs %v, A's log length %v vs %v", quiet.batches, started.batches, quiet.logLen, started.logLen)
	}
}

// TestCoverHeldGenesisAcrossRestart: a genesis held for the slot is
// durable: a bridge stopped before any slot batches it on its way out,
// and the restarted one serves the VM's evidence with it.
func TestCoverHeldGenesisAcrossRestart(t *testing.T) {
	cfg := mux.Config{Cover: mux.Cover{Pad: 8, Interval: time.Hour}}
	r := newRig(t, cfg)
	before := r.m.Status().Batches
	b := r.vm("vm-b") // no slot comes: returns once the genesis is durable
	if got := r.m.Status().Batches; got != before {
		t.Fatalf("the genesis was batched at once (%d → %d batches): not held for the slot", before, got)
	}
	r.close()
	r.open(cfg)
	if n := r.verified(b); n != 1 {
		t.Fatalf("B's evidence after the restart has %d records, want its genesis", n)
	}
}

// TestCoverHeldRecordsCountForFlush: records staged with a starting VM's
// genesis (held for the slot) still count towards Cover.Flush, so a
// streaming guest is not held for the slot because another VM started.
func TestCoverHeldRecordsCountForFlush(t *testing.T) {
	ctx := context.Background()
	m := muxtest.Open(t, mux.Config{Cover: mux.Cover{Pad: 4, Interval: time.Hour, Flush: 16}})
	a := newVMBatched(t, m, mux.Launch{UUID: [16]byte{0x74, 1}, Name: "vm-a"})
	time.Sleep(20 * time.Millisecond) // a kick left from the set-up is consumed
	r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: "x"}}
	var tickets []*mux.Ticket
	submit := func(k int) {
		for range k {
			tk, err := m.Submit(a.ID(), r)
			if err != nil {
				t.Fatal(err)
			}
			tickets = append(tickets, tk)
		}
	}
	submit(10) // below Flush: queued for the slot
	if _, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x74, 2}, Name: "vm-b"}); err != nil {
		t.Fatal(err)
	}
	submit(10) // 21 records not batched: over Flush
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// The committer may take the queue before the last records are in it:
	// a flush's worth (Flush = 16: the 10 held, B's genesis and 5 more) is
	// acknowledged without a slot, the rest may wait for one. Without the
	// held records counted, none would be.
	for i, tk := range tickets[:15] {
		if _, err := tk.Wait(wctx); err != nil {
			t.Fatalf("record %d of a flush's worth not acknowledged without a slot: %v", i, err)
		}
	}
}
