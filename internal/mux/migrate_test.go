package mux_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// host is one tpmmux host of a migration test: its own TPM (the in-process
// simulator, which is one per process, or a swtpm), log store and mux.
type host struct {
	t    *testing.T
	name string
	tp   tpm.TPM
	path string
	st   *logstore.Store
	m    *mux.Mux
}

// newHost opens a host on the TPM spec names ("sim", or "swtpm" to start
// a swtpm of its own).
func newHost(t *testing.T, name, spec string) *host {
	t.Helper()
	if spec == "swtpm" {
		spec = swtpmproc.StartTest(t).Spec()
	}
	tp, err := tpm.Open(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, name: name, tp: tp, path: filepath.Join(t.TempDir(), "log.db")}
	t.Cleanup(func() {
		h.close()
		tp.Close()
	})
	h.open()
	return h
}

func (h *host) open() {
	h.t.Helper()
	st, err := logstore.Open(h.path, &logstore.Options{NoSync: true})
	if err != nil {
		h.t.Fatal(err)
	}
	m, err := mux.Open(context.Background(), h.tp, st, mux.Config{Host: h.name})
	if err != nil {
		h.t.Fatal(err)
	}
	h.st, h.m = st, m
}

func (h *host) close() {
	if h.m != nil {
		h.m.Close()
		h.st.Close()
		h.m, h.st = nil, nil
	}
}

// appendN appends measurements from..to-1 to VM id on h.
func (h *host) appendN(id conceal.Digest, from, to int) {
	h.t.Helper()
	for i := from; i < to; i++ {
		if _, err := h.m.Append(h.t.Context(), id, meas(i)); err != nil {
			h.t.Fatalf("%s: append %d: %v", h.name, i, err)
		}
	}
}

// handover plays what the bridges' handover does around the mux: the
// source ends the VM's segment for dst, and dst opens the next one from
// the chain it got. It returns the source's final chain evidence.
func handover(t *testing.T, src, dst *host, ident *conceal.Identity, l mux.Launch) *evidence.Evidence {
	t.Helper()
	out := record.MigratedOut{DestHost: dst.name, DestAK: quote.AKFingerprint(dst.tp.AK())}
	rand.Read(out.Nonce[:])
	rand.Read(out.Credential[:])
	chain, err := src.m.MigrateOut(t.Context(), ident.ID(), out)
	if err != nil {
		t.Fatalf("%s: migrate out: %v", src.name, err)
	}
	// The retry of a handover after a crash gets the same chain.
	again, err := src.m.MigrateOut(t.Context(), ident.ID(), out)
	if err != nil || len(again.Records) != len(chain.Records) {
		t.Fatalf("%s: repeated migrate out: %v", src.name, err)
	}
	arr := mux.Arrival{Identity: ident, Launch: l, SourceHost: src.name, SourceAK: dst.tp.AK(), Chain: chain}
	if _, err := dst.m.MigrateIn(t.Context(), arr); err == nil || !strings.Contains(err.Error(), "not the source AK's") {
		t.Fatalf("%s: migrate in under another source AK: %v", dst.name, err)
	}
	arr.SourceAK = src.tp.AK()
	for range 2 { // the retry of a handover after a crash finds it done
		id, err := dst.m.MigrateIn(t.Context(), arr)
		if err != nil {
			t.Fatalf("%s: migrate in: %v", dst.name, err)
		}
		if id != ident.ID() {
			t.Fatalf("%s: the vm's id changed", dst.name)
		}
	}
	return chain
}

// TestMigrateMux: A -> B -> A on two TPMs (simulator and swtpm). Record
// numbers continue across hosts, the VM keeps its id, every evidence of
// the VM carries its earlier segments, A keeps its old segment beside the
// new one, and the source's segment ends for good (a teardown after it
// changes nothing, a second destination is refused).
func TestMigrateMux(t *testing.T) {
	ctx := t.Context()
	a, b := newHost(t, "hosta", "sim"), newHost(t, "hostb", "swtpm")
	l := mux.Launch{UUID: [16]byte{0x14, 1}, Name: "vm-m"}
	ident, err := a.m.NewVM(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	id := ident.ID()
	a.appendN(id, 1, 4) // records 0-3 on A, migrated-out is 4
	c1 := handover(t, a, b, ident, l)
	if len(c1.Records) != 5 || len(c1.Previous) != 0 || c1.Kind != evidence.KindFinal {
		t.Fatalf("A's chain: %d records, %d previous, kind %s", len(c1.Records), len(c1.Previous), c1.Kind)
	}
	if info, _ := a.m.Info(id); !info.Ended || info.EndedBy != mux.EndedByMigration || info.Live {
		t.Fatalf("A after migrate out: %+v", info)
	}
	if _, err := a.m.Teardown(ctx, id, "stopped"); err != nil {
		t.Fatalf("teardown after migration: %v", err)
	}
	other := record.MigratedOut{DestHost: "hostc", DestAK: [32]byte{1}}
	if _, err := a.m.MigrateOut(ctx, id, other); !errors.Is(err, mux.ErrNotMigrating) {
		t.Fatalf("second destination: %v, want ErrNotMigrating", err)
	}
	// The agent resumes on B where it stood on A (IMA log index 3 sent).
	if gs, err := b.m.Guest(id); err != nil || gs.Next != 4 {
		t.Fatalf("guest state on B after the arrival: %+v %v", gs, err)
	}
	b.appendN(id, 10, 13) // records 6-8 on B
	if n, _ := b.m.NextSeq(id); n != 9 {
		t.Fatalf("B's next record is %d, want 9", n)
	}
	ev, err := b.m.Evidence(ctx, id, []byte("nonce nonce nonce nonce"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ev.Previous) != 1 || len(ev.Records) != 4 {
		t.Fatalf("B's evidence: %d previous, %d records", len(ev.Previous), len(ev.Records))
	}
	in, err := record.Unmarshal(ev.Records[0].R)
	if err != nil || in.Kind != record.KindMigratedIn || in.MigratedIn.Seq != 5 || in.MigratedIn.Prev != record.Hash(c1.Records[4].R) {
		t.Fatalf("B's first record: %v %+v", err, in)
	}
	inc, err := b.m.EvidenceSince(ctx, id, []byte("nonce nonce nonce nonce 2"), &evidence.Since{Batch: 1, Records: 7})
	if err != nil || len(inc.Previous) != 1 || len(inc.Records) != 2 {
		t.Fatalf("B's incremental evidence: %v", err)
	}
	c2 := handover(t, b, a, ident, l) // B's migrated-out is 9, A's new segment starts at 10
	if len(c2.Previous) != 1 || len(c2.Records) != 5 {
		t.Fatalf("B's chain: %d previous, %d records", len(c2.Previous), len(c2.Records))
	}
	if gs, err := a.m.Guest(id); err != nil || gs.Next != 13 {
		t.Fatalf("guest state back on A: %+v %v (not A's old segment's)", gs, err)
	}
	a.appendN(id, 20, 22) // records 11-12 on A
	segs, err := a.m.Segments(id)
	if err != nil || len(segs) != 2 || segs[0].FirstSeq != 0 || segs[0].NextSeq != 5 || !segs[0].Final || segs[1].FirstSeq != 10 || segs[1].NextSeq != 13 || segs[1].Ended {
		t.Fatalf("A's segments: %v %+v", err, segs)
	}
	// A restart loads the live segment, not the old one.
	a.close()
	a.open()
	if got, ok := a.m.Lookup(l.Name); !ok || got != id {
		t.Fatal("A lost the live vm over a restart")
	}
	if _, err := a.m.Teardown(ctx, id, "destroyed"); err != nil {
		t.Fatal(err)
	}
	fin, err := a.m.FinalEvidence(id)
	if err != nil || len(fin.Previous) != 2 || len(fin.Records) != 4 || fin.Previous[1].Host != "hostb" {
		t.Fatalf("A's final evidence: %v", err)
	}
	// Streamed, the final evidence is byte for byte the built one, its
	// earlier segments included.
	var streamed []byte
	if err := a.m.StreamFinalEvidence(ctx, id, 256, func(p []byte, last bool) error { streamed = append(streamed, p...); return nil }); err != nil {
		t.Fatal(err)
	}
	if built, _ := fin.MarshalBinary(); !bytes.Equal(streamed, built) {
		t.Fatalf("streamed final evidence (%d bytes) differs from the built one (%d bytes)", len(streamed), len(built))
	}
	// The whole life verifies with both hosts' AKs (internal/verify
	// TestMigrationChain has the attacks).
	rep, err := verify.Verify(fin, verify.Options{PostMortem: true, Identity: ident, AKs: []*ecdsa.PublicKey{a.tp.AK(), b.tp.AK()}})
	if err != nil || rep.Records != 14 || len(rep.Segments) != 3 || !rep.Ended {
		t.Fatalf("verify the chain: %v", err)
	}
	// An old chain replayed to A (the first arrival's) is refused: A holds more.
	if _, err := a.m.MigrateIn(ctx, mux.Arrival{Identity: ident, Launch: l, SourceAK: b.tp.AK(), Chain: c1}); err == nil {
		t.Fatal("A accepted a chain that does not name it")
	}
	if _, err := a.m.MigrateIn(ctx, mux.Arrival{Identity: ident, Launch: l, SourceAK: b.tp.AK(), Chain: c2}); err == nil {
		t.Fatal("A accepted an old chain again")
	}
}

// The migration records are not held for the concealment slot: the
// migrated guest waits for the handover, which waits for the source's
// migrated-out record and the destination's migrated-in record. With a
// 2 s slot, a handover that waited for slots would take seconds.
func TestMigrationNotHeldForTheSlot(t *testing.T) {
	slow := mux.Config{Cover: mux.Cover{Pad: 16, Interval: 2 * time.Second}}
	a, b := newHost(t, "hosta", "sim"), newHost(t, "hostb", "swtpm")
	for _, h := range []*host{a, b} {
		h.close()
		st, err := logstore.Open(h.path, &logstore.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		cfg := slow
		cfg.Host = h.name
		m, err := mux.Open(context.Background(), h.tp, st, cfg)
		if err != nil {
			t.Fatal(err)
		}
		h.st, h.m = st, m
	}
	l := mux.Launch{UUID: [16]byte{0x7e, 1}, Name: "vm-slot"}
	ident, err := a.m.NewVM(t.Context(), l)
	if err != nil {
		t.Fatal(err)
	}
	out := record.MigratedOut{DestHost: b.name, DestAK: quote.AKFingerprint(b.tp.AK())}
	rand.Read(out.Nonce[:])
	start := time.Now()
	chain, err := a.m.MigrateOut(t.Context(), ident.ID(), out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.m.MigrateIn(t.Context(), mux.Arrival{Identity: ident, Launch: l, SourceHost: a.name, SourceAK: a.tp.AK(), Chain: chain}); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 1500*time.Millisecond {
		t.Fatalf("migrate out and in took %v with a 2 s slot: the migration records waited for slots", el)
	}
}
