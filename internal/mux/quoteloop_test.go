package mux_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// batchObserver records how the mux batched evidence requests into quotes.
type batchObserver struct {
	mu      sync.Mutex
	batches []quoteBatch
}

type quoteBatch struct {
	requests, awaited int
	waited            time.Duration
}

func (o *batchObserver) Batch(int)            {}
func (o *batchObserver) Extend(time.Duration) {}
func (o *batchObserver) Quote(time.Duration)  {}
func (o *batchObserver) QuoteBatch(requests, awaited int, waited time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.batches = append(o.batches, quoteBatch{requests, awaited, waited})
}

// TestClosedLoopSharesEveryQuote: verifiers in a closed loop (each asks
// again as soon as it has its evidence) on a slow TPM share every quote.
// The first request takes a quote alone and the rest of the first wave the
// next; from then on the quote loop gathers the verifiers it served before
// the next quote, so that R rounds take R+1 quotes (a few more when a
// loaded machine delays a verifier past a gather). Without the gather they
// split into cohorts that alternate (about 2R quotes), and without batching
// every request takes its own. Every response verifies, for its own nonce
// and VM, and the loop never waits for more requesters than there are (a
// gather that did waited out its timeout every round).
func TestClosedLoopSharesEveryQuote(t *testing.T) {
	cases := []struct {
		verifiers, rounds int
	}{
		{verifiers: 8, rounds: 6},
		{verifiers: 64, rounds: 6},
		{verifiers: 200, rounds: 1}, // one wave of concurrent requests
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("%d verifiers", c.verifiers), func(t *testing.T) {
			obs := &batchObserver{}
			r := newRig(t, mux.Config{Observer: obs})
			idents := []*conceal.Identity{r.vm("vm-a"), r.vm("vm-b"), r.vm("vm-c")}
			r.tpm.quoteDelay = 100 * time.Millisecond
			base := r.tpm.quotes.Load()
			type answer struct {
				ident *conceal.Identity
				nonce []byte
				ev    *evidence.Evidence
			}
			answers := make([][]answer, c.verifiers)
			errs := make(chan error, c.verifiers)
			var wg sync.WaitGroup
			for i := range c.verifiers {
				ident := idents[i%len(idents)]
				wg.Go(func() {
					for round := range c.rounds {
						nonce := []byte(fmt.Sprintf("verifier %d, round %d, a fresh nonce", i, round))
						ev, err := r.m.Evidence(context.Background(), ident.ID(), nonce)
						if err != nil {
							errs <- err
							return
						}
						answers[i] = append(answers[i], answer{ident, nonce, ev})
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			quotes := int(r.tpm.quotes.Load() - base)
			obs.mu.Lock()
			batches := append([]quoteBatch(nil), obs.batches...)
			obs.mu.Unlock()
			t.Logf("%d verifiers, %d rounds: %d quotes; batches %v", c.verifiers, c.rounds, quotes, batches)
			// Allow a few quotes more than the ideal R+1 for verifiers that
			// a loaded machine delays past a gather (each costs one quote:
			// the next gather merges them back); without the gather it is 2R.
			if bound := c.rounds + 1 + max(1, c.rounds/3); quotes > bound {
				t.Errorf("%d quotes for %d rounds of %d closed-loop verifiers, want at most %d: the verifiers do not share quotes", quotes, c.rounds, c.verifiers, bound)
			}
			for _, b := range batches {
				if b.awaited > c.verifiers {
					t.Errorf("the quote loop waited for %d requesters, but there are %d", b.awaited, c.verifiers)
				}
			}
			batched := 0
			for _, as := range answers {
				for _, a := range as {
					rep, err := verify.Verify(a.ev, verify.Options{Nonce: a.nonce, Identity: a.ident, AK: r.tpm.AK(), PCR: 13})
					if err != nil {
						t.Fatalf("evidence from a shared quote rejected: %v", err)
					}
					if rep.Batched {
						batched++
					}
				}
			}
			if want := c.verifiers*c.rounds - quotes; batched < want {
				t.Errorf("%d of %d responses came from shared quotes, want at least %d", batched, c.verifiers*c.rounds, want)
			}
		})
	}
}

// TestStreamSharedQuotes: evidence streamed (StreamEvidence, the bridge's
// path) for concurrent requests that share quotes verifies for its own
// nonce and VM, in full and from a checkpoint, and re-encodes to itself.
func TestStreamSharedQuotes(t *testing.T) {
	r := newRig(t, mux.Config{})
	idents := []*conceal.Identity{r.vm("vm-a"), r.vm("vm-b")}
	for i := range 20 {
		if _, err := r.m.Submit(idents[i%2].ID(), meas(i)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	cps := r.checkpoints(t, idents, []byte("the checkpoint's nonce, fresh"))
	for i := range 6 {
		if _, err := r.m.Submit(idents[i%2].ID(), meas(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	r.tpm.quoteDelay = 50 * time.Millisecond
	const n = 24
	type answer struct {
		vm    int
		nonce []byte
		incr  bool
		raw   []byte
		err   error
	}
	out := make(chan answer, n)
	for i := range n {
		go func() {
			a := answer{vm: i % 2, nonce: []byte(fmt.Sprintf("streamed request %d, fresh nonce", i)), incr: i%3 == 0}
			var since *evidence.Since
			if a.incr {
				since = cps[a.vm].Since()
			}
			a.err = r.m.StreamEvidence(ctx, idents[a.vm].ID(), a.nonce, since, 0, func(p []byte, last bool) error {
				a.raw = append(a.raw, p...)
				return nil
			})
			out <- a
		}()
	}
	batched := 0
	for range n {
		a := <-out
		if a.err != nil {
			t.Fatal(a.err)
		}
		ev, err := evidence.Decode(a.raw)
		if err != nil {
			t.Fatal(err)
		}
		if again, err := ev.MarshalBinary(); err != nil || !bytes.Equal(again, a.raw) {
			t.Fatalf("streamed evidence does not re-encode to itself (%v)", err)
		}
		opts := verify.Options{Nonce: a.nonce, Identity: idents[a.vm], AK: r.tpm.AK(), PCR: 13}
		if a.incr {
			opts.Checkpoint = cps[a.vm]
		}
		rep, err := verify.Verify(ev, opts)
		if err != nil {
			t.Fatalf("streamed evidence (incremental %v) rejected: %v", a.incr, err)
		}
		if rep.Batched {
			batched++
		}
	}
	if batched < n/2 {
		t.Fatalf("%d of %d streamed responses from shared quotes", batched, n)
	}
}
