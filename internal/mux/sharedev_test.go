package mux_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/crc32c"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// TestSharedEvidenceIsolation: the requests one quote answers share its
// encoded fields, each VM's fields per checkpoint and the public log
// segment per checkpoint, but every response is its own VM's evidence from
// its own checkpoint: two co-tenant VMs, each asked for in full and from a
// checkpoint, many times over, all in one quote. Each response carries
// its own VM's identity, verifies with it (and would not with the other's:
// the records would not open under another VM's key), holds exactly the
// records and batches EvidenceSince gives for its VM and checkpoint, and
// the next quote, after more batches, gets a longer log (no stale segment)
// and the new records.
func TestSharedEvidenceIsolation(t *testing.T) {
	r := newRig(t, mux.Config{})
	ctx := context.Background()
	idents, cps := r.coTenants(t)
	r.tpm.quoteDelay = 100 * time.Millisecond
	for round := range 2 {
		// New records for both VMs (more for b, so its delta differs).
		for i := range 3 + 4*round {
			for v := range idents {
				for range 1 + v {
					if _, err := r.m.Append(ctx, idents[v].ID(), meas(1000*round+10*i+v)); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		type req struct {
			vm   int
			incr bool
		}
		var reqs []req
		for k := range 24 {
			reqs = append(reqs, req{vm: k % 2, incr: k%4 >= 2})
		}
		// A request that keeps the TPM busy, so the others queue and share
		// the next quote.
		busy := make(chan error, 1)
		go func() {
			_, err := r.m.Evidence(ctx, idents[0].ID(), []byte("busy"))
			busy <- err
		}()
		time.Sleep(20 * time.Millisecond)
		type answer struct {
			raw   []byte
			ident *conceal.Identity
			err   error
		}
		out := make([]chan answer, len(reqs))
		for k, q := range reqs {
			out[k] = make(chan answer, 1)
			go func() {
				var a answer
				var since *evidence.Since
				if q.incr {
					since = cps[q.vm].Since()
				}
				nonce := []byte(fmt.Sprintf("round %d request %d", round, k))
				a.err = r.m.StreamEvidenceParts(ctx, idents[q.vm].ID(), nonce, since, 1<<20, true, false, func(p *mux.EvidencePart) error {
					if p.Identity != nil {
						a.ident = p.Identity
					}
					for _, r := range p.Head {
						a.raw = append(a.raw, r...)
					}
					a.raw = append(a.raw, p.Shared.Bytes...)
					for _, r := range p.Tail {
						a.raw = append(a.raw, r...)
					}
					if crc32c.Checksum(p.Shared.Bytes) != p.Shared.CRC {
						return fmt.Errorf("shared segment's CRC-32C is not its bytes'")
					}
					return nil
				})
				out[k] <- a
			}()
		}
		if err := <-busy; err != nil {
			t.Fatal(err)
		}
		var attest []byte
		for k, q := range reqs {
			a := <-out[k]
			if a.err != nil {
				t.Fatal(a.err)
			}
			var cp *verify.Checkpoint
			if q.incr {
				cp = cps[q.vm]
			}
			ev := r.checkOwnEvidence(t, a.raw, a.ident, idents[q.vm], idents[1-q.vm], []byte(fmt.Sprintf("round %d request %d", round, k)), cp, len(reqs))
			if attest == nil {
				attest = ev.Quote.Attest
			} else if !bytes.Equal(attest, ev.Quote.Attest) {
				t.Fatalf("round %d: the requests did not share one quote", round)
			}
		}
	}
}

// coTenants makes two VMs with 20 records between them and a checkpoint
// of each (in that order).
func (r *rig) coTenants(t *testing.T) ([]*conceal.Identity, []*verify.Checkpoint) {
	t.Helper()
	idents := []*conceal.Identity{r.vm("vm-a"), r.vm("vm-b")}
	for i := range 20 {
		if _, err := r.m.Submit(idents[i%2].ID(), meas(i)); err != nil {
			t.Fatal(err)
		}
	}
	return idents, r.checkpoints(t, idents, []byte("the checkpoint's nonce"))
}

// checkOwnEvidence checks one streamed response of a shared quote of n
// requests: it carried identity got, which is own's; raw is canonical
// evidence with an audit path among n that verifies for own with nonce
// (from checkpoint cp, or in full), not as other's, and holds exactly the
// records and batches EvidenceSince gives for own and cp. It returns the
// decoded evidence.
func (r *rig) checkOwnEvidence(t *testing.T, raw []byte, got, own, other *conceal.Identity, nonce []byte, cp *verify.Checkpoint, n int) *evidence.Evidence {
	t.Helper()
	if got == nil || got.UUID != own.UUID || got.Instance != own.Instance || got.Key != own.Key {
		t.Fatalf("%q: the response carries another identity", nonce)
	}
	ev, err := evidence.Decode(raw)
	if err != nil {
		t.Fatalf("%q: %v", nonce, err)
	}
	if again, err := ev.MarshalBinary(); err != nil || !bytes.Equal(again, raw) {
		t.Fatalf("%q: evidence does not re-encode to itself (%v)", nonce, err)
	}
	if ev.Batched == nil || ev.Batched.Count != uint64(n) {
		t.Fatalf("%q: audit path %+v, want one of %d", nonce, ev.Batched, n)
	}
	opts := verify.Options{Nonce: nonce, Identity: own, AK: r.tpm.AK(), PCR: 13, Checkpoint: cp}
	var since *evidence.Since
	if cp != nil {
		since = cp.Since()
	}
	if rep, err := verify.Verify(ev, opts); err != nil || !rep.Trusted || !rep.Fresh {
		t.Fatalf("%q (incremental %v): %v", nonce, cp != nil, err)
	}
	opts.Identity, opts.Checkpoint = other, nil
	if rep, err := verify.Verify(ev, opts); err == nil && rep.Trusted {
		t.Fatalf("%q: the evidence verifies as the other VM's", nonce)
	}
	ref, err := r.m.EvidenceSince(context.Background(), own.ID(), []byte("ref"), since)
	if err != nil {
		t.Fatal(err)
	}
	if !sameJSON(ev.Records, ref.Records) || !sameJSON(ev.Log, ref.Log) || !sameJSON(ev.VM, ref.VM) {
		t.Fatalf("%q (incremental %v): %d records and %d batches, EvidenceSince has %d and %d",
			nonce, cp != nil, len(ev.Records), len(ev.Log), len(ref.Records), len(ref.Log))
	}
	return ev
}

func sameJSON(x, y any) bool {
	bx, _ := json.Marshal(x)
	by, _ := json.Marshal(y)
	return bytes.Equal(bx, by)
}

// TestQuoteBatchOverflow: more requests queue during a quote than one
// quote may serve (4096): the first 4096 share the next quote and the rest
// the one after; every request is answered, by a quote it did not arrive
// after, with an audit path of its own.
func TestQuoteBatchOverflow(t *testing.T) {
	if testing.Short() {
		t.Skip("4200 evidence requests")
	}
	r := newRig(t, mux.Config{})
	ctx := context.Background()
	id := r.vm("vm-a")
	// The first quote is held until all n requests queue behind it, so
	// that they all wait for the next one however slow the machine is.
	hold := make(chan struct{})
	r.tpm.quoteHold.Store(&hold)
	q0 := r.tpm.quotes.Load()
	busy := make(chan error, 1)
	go func() {
		_, err := r.m.Evidence(ctx, id.ID(), []byte("busy"))
		busy <- err
	}()
	for r.tpm.quotes.Load() == q0 {
		time.Sleep(time.Millisecond)
	}
	q0 = r.tpm.quotes.Load()
	const n = 4200
	type answer struct {
		ev  *evidence.Evidence
		err error
	}
	out := make(chan answer, n)
	for i := range n {
		go func() {
			ev, err := r.m.Evidence(ctx, id.ID(), []byte(fmt.Sprintf("request %d", i)))
			out <- answer{ev, err}
		}()
	}
	for r.m.QueuedQuotes() < n {
		time.Sleep(time.Millisecond)
	}
	r.tpm.quoteHold.Store(nil)
	close(hold)
	if err := <-busy; err != nil {
		t.Fatal(err)
	}
	counts := map[uint64]int{}
	for range n {
		a := <-out
		if a.err != nil {
			t.Fatal(a.err)
		}
		if a.ev.Batched == nil {
			t.Fatal("a request of a full queue got a quote of its own")
		}
		counts[a.ev.Batched.Count]++
	}
	if counts[4096] != 4096 || counts[n-4096] != n-4096 || len(counts) != 2 {
		t.Fatalf("requests per quote: %v, want 4096 and %d", counts, n-4096)
	}
	if q := r.tpm.quotes.Load() - q0; q != 2 {
		t.Fatalf("%d quotes for the queue, want 2", q)
	}
}

// checkpoints verifies full evidence of each VM with nonce and returns
// the checkpoints a verifier keeps from it, in the order of idents.
func (r *rig) checkpoints(t *testing.T, idents []*conceal.Identity, nonce []byte) []*verify.Checkpoint {
	t.Helper()
	cps := make([]*verify.Checkpoint, len(idents))
	for i, id := range idents {
		ev, err := r.m.Evidence(context.Background(), id.ID(), nonce)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: id, AK: r.tpm.AK(), PCR: 13})
		if err != nil {
			t.Fatal(err)
		}
		cps[i] = rep.Checkpoint
	}
	return cps
}
