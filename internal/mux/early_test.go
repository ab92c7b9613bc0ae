package mux_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/crc32c"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// earlyAnswer is what one streamed request got: the evidence joined as
// wire.Assembler joins it (the parts that are not early, then the early
// ones), and when the early parts and the last one came.
type earlyAnswer struct {
	start, end []byte
	parts      int
	earlyParts int
	ident      *conceal.Identity
	err        error
}

func (a *earlyAnswer) raw() []byte { return append(append([]byte(nil), a.start...), a.end...) }

// streamEarly asks for VM id's evidence with early set, collecting the
// parts; early is signalled when an early part has come.
func streamEarly(ctx context.Context, m *mux.Mux, id conceal.Digest, nonce []byte, since *evidence.Since, early bool, gotEarly chan<- struct{}) *earlyAnswer {
	return streamEarlyChunk(ctx, m, id, nonce, since, early, gotEarly, 1<<20)
}

// streamEarlyChunk is streamEarly with parts of at most chunk bytes.
func streamEarlyChunk(ctx context.Context, m *mux.Mux, id conceal.Digest, nonce []byte, since *evidence.Since, early bool, gotEarly chan<- struct{}, chunk int) *earlyAnswer {
	a := new(earlyAnswer)
	a.err = m.StreamEvidenceParts(ctx, id, nonce, since, chunk, true, early, func(p *mux.EvidencePart) error {
		a.parts++
		if p.Identity != nil {
			if a.parts != 1 {
				return fmt.Errorf("identity on part %d", a.parts)
			}
			a.ident = p.Identity
		}
		if crc32c.Checksum(p.Shared.Bytes) != p.Shared.CRC {
			return fmt.Errorf("shared segment's CRC-32C is not its bytes'")
		}
		var b []byte
		for _, r := range p.Head {
			b = append(b, r...)
		}
		b = append(b, p.Shared.Bytes...)
		for _, r := range p.Tail {
			b = append(b, r...)
		}
		if p.Early {
			if len(a.start) > 0 || p.Last {
				return fmt.Errorf("early part after the start, or last")
			}
			a.earlyParts++
			a.end = append(a.end, b...)
			if gotEarly != nil {
				gotEarly <- struct{}{}
			}
			return nil
		}
		a.start = append(a.start, b...)
		return nil
	})
	return a
}

// TestEarlyEvidence: requests that ask for early evidence get the end of
// their evidence (log segment, VM fields, audit path) while the TPM is
// still taking the shared quote, and the quote's fields after it; joined,
// the parts are byte for byte canonical evidence that verifies for the
// request's own VM, nonce and checkpoint, holds what EvidenceSince holds,
// and does not verify as the co-tenant's. Requests with and without early
// share one quote. A request the quote answers alone gets no early part,
// nor does one whose evidence's end does not fit one part: it gets its
// evidence in parts as without early.
func TestEarlyEvidence(t *testing.T) {
	r := newRig(t, mux.Config{})
	ctx := context.Background()
	idents, cps := r.coTenants(t)
	for i := range 6 {
		if _, err := r.m.Append(ctx, idents[i%2].ID(), meas(100+i)); err != nil {
			t.Fatal(err)
		}
	}

	// A lone request: its quote is taken at once, nothing to overlap.
	lone := streamEarly(ctx, r.m, idents[0].ID(), []byte("lone"), nil, true, nil)
	if lone.err != nil || lone.earlyParts != 0 || lone.parts != 1 {
		t.Fatalf("lone request: %d parts, %d early, err %v; want one part, none early", lone.parts, lone.earlyParts, lone.err)
	}

	// The first quote is held until every request has queued behind it;
	// the second, which answers them all, until every early part has come.
	hold1, hold2 := make(chan struct{}), make(chan struct{})
	r.tpm.quoteHold.Store(&hold1)
	q0 := r.tpm.quotes.Load()
	busy := make(chan error, 1)
	go func() {
		_, err := r.m.Evidence(ctx, idents[0].ID(), []byte("busy"))
		busy <- err
	}()
	for r.tpm.quotes.Load() == q0 {
		time.Sleep(time.Millisecond)
	}
	type req struct {
		vm          int
		incr, early bool
	}
	var reqs []req
	for k := range 16 {
		reqs = append(reqs, req{vm: k % 2, incr: k%4 >= 2, early: k%8 < 6})
	}
	gotEarly := make(chan struct{}, len(reqs))
	out := make([]chan *earlyAnswer, len(reqs))
	nEarly := 0
	for k, q := range reqs {
		if q.early {
			nEarly++
		}
		out[k] = make(chan *earlyAnswer, 1)
		go func() {
			var since *evidence.Since
			if q.incr {
				since = cps[q.vm].Since()
			}
			out[k] <- streamEarly(ctx, r.m, idents[q.vm].ID(), []byte(fmt.Sprintf("early evidence request %02d", k)), since, q.early, gotEarly)
		}()
	}
	for r.m.QueuedQuotes() < len(reqs) {
		time.Sleep(time.Millisecond)
	}
	r.tpm.quoteHold.Store(&hold2)
	released := false
	defer func() {
		// A failure below must not leave the quote held for the rig's
		// clean-up to wait on.
		if !released {
			r.tpm.quoteHold.Store(nil)
			close(hold2)
		}
	}()
	close(hold1)
	if err := <-busy; err != nil {
		t.Fatal(err)
	}
	deadline := time.After(20 * time.Second)
	for range nEarly {
		select {
		case <-gotEarly:
		case <-deadline:
			t.Fatal("early parts did not come while the quote was taken")
		}
	}
	// Every early part came while the TPM still held the quote.
	for k := range reqs {
		select {
		case a := <-out[k]:
			t.Fatalf("request %d answered before its quote was taken (err %v)", k, a.err)
		default:
		}
	}
	r.tpm.quoteHold.Store(nil)
	close(hold2)
	released = true

	var attest []byte
	for k, q := range reqs {
		a := <-out[k]
		if a.err != nil {
			t.Fatal(a.err)
		}
		if want := map[bool]int{true: 1, false: 0}[q.early]; a.earlyParts != want || a.parts != want+1 {
			t.Fatalf("request %d (early %v): %d parts, %d early", k, q.early, a.parts, a.earlyParts)
		}
		var cp *verify.Checkpoint
		if q.incr {
			cp = cps[q.vm]
		}
		ev := r.checkOwnEvidence(t, a.raw(), a.ident, idents[q.vm], idents[1-q.vm], []byte(fmt.Sprintf("early evidence request %02d", k)), cp, len(reqs))
		if attest == nil {
			attest = ev.Quote.Attest
		} else if !bytes.Equal(attest, ev.Quote.Attest) {
			t.Fatal("the requests did not share one quote")
		}
	}

	// A shared quote whose evidence's end does not fit one part: no early
	// part, and the evidence comes in parts as without early.
	r.tpm.quoteDelay = 100 * time.Millisecond
	busy2 := make(chan error, 1)
	go func() {
		_, err := r.m.Evidence(ctx, idents[0].ID(), []byte("busy"))
		busy2 <- err
	}()
	time.Sleep(20 * time.Millisecond)
	small := make([]chan *earlyAnswer, 2)
	for k := range small {
		small[k] = make(chan *earlyAnswer, 1)
		go func() {
			small[k] <- streamEarlyChunk(ctx, r.m, idents[k].ID(), []byte(fmt.Sprintf("small parts request %02d", k)), nil, true, nil, 512)
		}()
	}
	if err := <-busy2; err != nil {
		t.Fatal(err)
	}
	for k := range small {
		a := <-small[k]
		if a.err != nil {
			t.Fatal(a.err)
		}
		if a.earlyParts != 0 || a.parts < 2 {
			t.Fatalf("small parts request %d: %d parts, %d early; want several, none early", k, a.parts, a.earlyParts)
		}
		r.checkOwnEvidence(t, a.raw(), a.ident, idents[k], idents[1-k], []byte(fmt.Sprintf("small parts request %02d", k)), nil, len(small))
	}
}
