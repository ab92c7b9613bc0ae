package bridge

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// slowQuoteTPM is the simulator with a quote as slow as a hardware TPM's,
// so that requests queue behind one and share the next.
type slowQuoteTPM struct {
	tpm.TPM
	d time.Duration
}

func (s slowQuoteTPM) Quote(ctx context.Context, pcrs []int, extra []byte) (tpm.Quote, error) {
	time.Sleep(s.d)
	return s.TPM.Quote(ctx, pcrs, extra)
}

// TestEarlyEvidenceOverWire: verifiers that ask for early evidence over
// the guest protocol, several sharing one quote, each get an early part
// (with the identity and the AK, as part 0) and then the last part;
// wire.Assembler joins them into evidence that verifies for the
// requester's own VM and nonce with the AK the response carried. A
// verifier in the same quote that never reads its early part delays none
// of them.
func TestEarlyEvidenceOverWire(t *testing.T) {
	ctx := context.Background()
	m := muxtest.OpenWrapped(t, mux.Config{}, func(sim tpm.TPM) tpm.TPM { return slowQuoteTPM{TPM: sim, d: 150 * time.Millisecond} })
	b := &Bridge{Mux: m}
	var idents []*conceal.Identity
	for i, name := range []string{"vm-a", "vm-b"} {
		ident, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{byte(i + 1)}, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		idents = append(idents, ident)
	}
	// A verifier that asks for early evidence and never reads: its early
	// part blocks its own session, and nobody else's (its request shares
	// the quote below with the others).
	stalled, stalledEnd := net.Pipe()
	defer stalled.Close()
	go b.Serve(ctx, idents[1].ID(), stalledEnd, false)
	// A request that keeps the TPM busy, so that the others queue.
	busy := make(chan error, 1)
	go func() {
		_, err := m.Evidence(ctx, idents[0].ID(), []byte("busy"))
		busy <- err
	}()
	time.Sleep(30 * time.Millisecond)
	if err := wire.NewConn(stalled, false).Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: 1, Nonce: []byte("a verifier that never reads"), Early: true}); err != nil {
		t.Fatal(err)
	}
	const n = 8
	type answer struct {
		resp  *wire.EvidenceResponse
		early int
		err   error
	}
	out := make(chan answer, n)
	for k := range n {
		vm := k % 2
		go func() {
			a := answer{}
			defer func() { out <- a }()
			g, h := net.Pipe()
			defer g.Close()
			go b.Serve(ctx, idents[vm].ID(), h, false)
			c := wire.NewConn(g, false)
			if a.err = c.Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: uint64(100 + k), Nonce: []byte(fmt.Sprintf("early over the wire %02d", k)), Early: true}); a.err != nil {
				return
			}
			var asm wire.Assembler
			for a.resp == nil {
				f, err := c.Recv()
				if err != nil {
					a.err = err
					return
				}
				var m wire.EvidenceResponse
				if a.err = wire.Decode(f, &m); a.err != nil {
					return
				}
				if m.Early {
					a.early++
				}
				if a.resp, a.err = asm.Add(&m); a.err != nil {
					return
				}
			}
			a.resp.ID = uint64(k) // which request it answered
		}()
	}
	if err := <-busy; err != nil {
		t.Fatal(err)
	}
	for range n {
		var a answer
		select {
		case a = <-out:
		case <-time.After(WriteTimeout / 2):
			t.Fatal("a verifier that does not read held up the others")
		}
		if a.err != nil {
			t.Fatal(a.err)
		}
		k := int(a.resp.ID)
		if a.early != 1 {
			t.Fatalf("request %d: %d early parts, want 1 (the requests shared a quote)", k, a.early)
		}
		own := idents[k%2]
		if got := (conceal.Identity{UUID: a.resp.UUID, Instance: a.resp.Instance, Key: a.resp.Key}); got != *own {
			t.Fatalf("request %d: handed another identity", k)
		}
		blk, _ := pem.Decode(a.resp.AKPEM)
		if blk == nil {
			t.Fatalf("request %d: no AK", k)
		}
		ak, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		ev, err := evidence.Decode(a.resp.Evidence)
		if err != nil {
			t.Fatalf("request %d: %v", k, err)
		}
		if ev.Batched == nil || ev.Batched.Count != n+1 {
			t.Fatalf("request %d: audit path %+v, want one of %d (with the stalled verifier's)", k, ev.Batched, n+1)
		}
		rep, err := verify.Verify(ev, verify.Options{Nonce: []byte(fmt.Sprintf("early over the wire %02d", k)), Identity: own, AK: ak.(*ecdsa.PublicKey), PCR: 13})
		if err != nil || !rep.Trusted || !rep.Fresh {
			t.Fatalf("request %d: %v", k, err)
		}
	}
}
