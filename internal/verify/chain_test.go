package verify_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// mhost is one host of a migration: its own swtpm, log store and mux.
type mhost struct {
	t    *testing.T
	name string
	tp   tpm.TPM
	st   *logstore.Store
	m    *mux.Mux
}

func newMHost(t *testing.T, name string) *mhost {
	t.Helper()
	p := swtpmproc.StartTest(t)
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	h := &mhost{t: t, name: name, tp: tp}
	t.Cleanup(func() {
		h.close()
		tp.Close()
	})
	h.open(filepath.Join(t.TempDir(), "log.db"))
	return h
}

// open opens the host's mux on the store at path (a host root who swaps
// the store for a fresh one opens a new epoch on the same TPM).
func (h *mhost) open(path string) {
	h.t.Helper()
	st, err := logstore.Open(path, &logstore.Options{NoSync: true})
	if err != nil {
		h.t.Fatal(err)
	}
	m, err := mux.Open(context.Background(), h.tp, st, mux.Config{Host: h.name, MaxBatch: 4, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		h.t.Fatal(err)
	}
	h.st, h.m = st, m
}

func (h *mhost) close() {
	if h.m != nil {
		h.m.Close()
		h.st.Close()
		h.m, h.st = nil, nil
	}
}

func (h *mhost) add(id conceal.Digest, vm string, from, to int) {
	h.t.Helper()
	for i := from; i < to; i++ {
		if _, err := h.m.Append(h.t.Context(), id, measurement(vm, i)); err != nil {
			h.t.Fatalf("%s: %v", h.name, err)
		}
	}
}

func (h *mhost) fresh(id conceal.Digest, nonce []byte) *evidence.Evidence {
	h.t.Helper()
	ev, err := h.m.Evidence(h.t.Context(), id, nonce)
	if err != nil {
		h.t.Fatalf("%s: evidence: %v", h.name, err)
	}
	return ev
}

// move migrates VM ident from src to dst as the bridges' handover does
// around the mux, the destination verifying the chain first with the AKs
// of every host it ran on. It returns the source's final chain evidence.
func move(t *testing.T, src, dst *mhost, ident *conceal.Identity, l mux.Launch, vpcrs *vpcr.Snapshot, aks ...*ecdsa.PublicKey) *evidence.Evidence {
	t.Helper()
	out := record.MigratedOut{DestHost: dst.name, DestAK: quote.AKFingerprint(dst.tp.AK())}
	rand.Read(out.Nonce[:])
	chain, err := src.m.MigrateOut(t.Context(), ident.ID(), out)
	if err != nil {
		t.Fatalf("%s -> %s: %v", src.name, dst.name, err)
	}
	if _, err := verify.Verify(chain, verify.Options{PostMortem: true, Identity: ident, AKs: aks}); err != nil {
		t.Fatalf("%s -> %s: the destination's check of the chain: %v", src.name, dst.name, err)
	}
	if _, err := dst.m.MigrateIn(t.Context(), mux.Arrival{Identity: ident, Launch: l, SourceHost: src.name, SourceAK: src.tp.AK(), Chain: chain, VPCRs: vpcrs}); err != nil {
		t.Fatalf("%s -> %s: %v", src.name, dst.name, err)
	}
	return chain
}

// life is a VM's history across two hosts, A -> B -> A -> B, with a
// co-tenant on B and a second migrated VM (x), and what a verifier saw
// along the way.
type life struct {
	a, b       *mhost
	vm, x, co  *conceal.Identity
	lvm, lx    mux.Launch
	c1, c2, c3 *evidence.Evidence // the chains handed over: A0, B1 (+A0), A2 (+A0, B1)
	evB1       *evidence.Evidence // fresh on B, 2 segments
	cpB1       *verify.Checkpoint // the verifier's checkpoint of evB1
	deltaB1    *evidence.Evidence // B's incremental evidence after cpB1 (streamed)
	deltaB1b   *evidence.Evidence // the same, built whole
	evA2       *evidence.Evidence // fresh on A, 3 segments
	evA0       *evidence.Evidence // fresh on A before the first migration
	evX        *evidence.Evidence // x's fresh evidence on B (2 segments)
	finB3      *evidence.Evidence // final evidence after the teardown on B, 4 segments
	nonce      []byte
}

func buildLife(t *testing.T) *life {
	t.Helper()
	ctx := t.Context()
	lf := &life{a: newMHost(t, "hosta"), b: newMHost(t, "hostb"), nonce: []byte("the verifier's nonce, 32 bytes..")}
	lf.lvm = mux.Launch{UUID: [16]byte{0x14, 0xa}, Name: "vm-mig"}
	lf.lx = mux.Launch{UUID: [16]byte{0x14, 0xb}, Name: "vm-x"}
	var err error
	if lf.vm, err = lf.a.m.NewVM(ctx, lf.lvm); err != nil {
		t.Fatal(err)
	}
	if lf.x, err = lf.a.m.NewVM(ctx, lf.lx); err != nil {
		t.Fatal(err)
	}
	if lf.co, err = lf.b.m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x14, 0xc}, Name: "vm-co"}); err != nil {
		t.Fatal(err)
	}
	id := lf.vm.ID()
	lf.a.add(id, "vm-mig", 1, 4) // records 1-3 on A
	lf.a.add(lf.x.ID(), "vm-x", 1, 3)
	lf.b.add(lf.co.ID(), "vm-co", 1, 5)
	lf.evA0 = lf.a.fresh(id, lf.nonce)
	akA, akB := lf.a.tp.AK(), lf.b.tp.AK()
	lf.c1 = move(t, lf.a, lf.b, lf.vm, lf.lvm, nil, akA) // migrated-out 4, B1 starts at 5
	move(t, lf.a, lf.b, lf.x, lf.lx, nil, akA)
	lf.b.add(id, "vm-mig", 10, 13) // records 6-8 on B
	lf.b.add(lf.x.ID(), "vm-x", 10, 12)
	lf.b.add(lf.co.ID(), "vm-co", 10, 12)
	lf.evB1 = lf.b.fresh(id, lf.nonce)
	lf.evX = lf.b.fresh(lf.x.ID(), lf.nonce)
	rep, err := verify.Verify(lf.evB1, verify.Options{Nonce: lf.nonce, Identity: lf.vm, AKs: []*ecdsa.PublicKey{akA, akB}})
	if err != nil {
		t.Fatalf("verify B1: %v", err)
	}
	lf.cpB1 = rep.Checkpoint
	lf.b.add(id, "vm-mig", 13, 15) // records 9-10 on B
	var buf bytes.Buffer
	err = lf.b.m.StreamEvidence(ctx, id, lf.nonce, lf.cpB1.Since(), 512, func(p []byte, last bool) error { buf.Write(p); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if lf.deltaB1, err = evidence.Decode(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if lf.deltaB1b, err = lf.b.m.EvidenceSince(ctx, id, lf.nonce, lf.cpB1.Since()); err != nil {
		t.Fatal(err)
	}
	lf.c2 = move(t, lf.b, lf.a, lf.vm, lf.lvm, nil, akA, akB) // migrated-out 11, A2 starts at 12
	lf.a.add(id, "vm-mig", 20, 22)                            // records 13-14 on A
	lf.evA2 = lf.a.fresh(id, lf.nonce)
	lf.c3 = move(t, lf.a, lf.b, lf.vm, lf.lvm, nil, akA, akB) // migrated-out 15, B3 starts at 16
	lf.b.add(id, "vm-mig", 30, 32)                            // records 17-18 on B
	if _, err := lf.b.m.Teardown(ctx, id, "destroyed"); err != nil {
		t.Fatal(err)
	}
	if lf.finB3, err = lf.b.m.FinalEvidence(id); err != nil {
		t.Fatal(err)
	}
	return lf
}

func (lf *life) aks() []*ecdsa.PublicKey { return []*ecdsa.PublicKey{lf.a.tp.AK(), lf.b.tp.AK()} }

// segs returns the chain of ev with its segments replaced as given:
// prev are the previous segments, last the evidence's own.
func segs(last *evidence.Evidence, prev ...*evidence.Evidence) *evidence.Evidence {
	out := *last
	out.Previous = nil
	for _, p := range prev {
		q := *p
		q.Previous = nil
		out.Previous = append(out.Previous, q)
	}
	return &out
}

// lastSeg returns ev's own segment, without its Previous.
func lastSeg(ev *evidence.Evidence) *evidence.Evidence { s := ev.Segments(); return s[len(s)-1] }

// TestMigrationChain: the life of a VM that moved A -> B -> A -> B between
// two hosts (two swtpms) verifies as one history with both AKs, fresh and
// post-mortem and incrementally; each attack on the chain is rejected for
// its reason; a co-tenant's verifier on the destination learns nothing of
// the arrival; the VM's tags never repeat across hosts.
func TestMigrationChain(t *testing.T) {
	lf := buildLife(t)
	akA, akB := lf.a.tp.AK(), lf.b.tp.AK()
	pm := verify.Options{PostMortem: true, Identity: lf.vm, AKs: lf.aks()}
	fr := verify.Options{Nonce: lf.nonce, Identity: lf.vm, AKs: lf.aks()}

	t.Run("verifies", func(t *testing.T) {
		tests := []struct {
			name     string
			ev       *evidence.Evidence
			opts     verify.Options
			segments int
			records  int
			hosts    string
			end      string
		}{
			{"fresh on B, 2 segments", lf.evB1, fr, 2, 9, "hosta hostb", ""},
			{"fresh on A again, 3 segments", lf.evA2, fr, 3, 15, "hosta hostb hosta", ""},
			{"the first chain handed over, A's key only", lf.c1, verify.Options{PostMortem: true, Identity: lf.vm, AK: akA}, 1, 5, "hosta", "migrated-out"},
			{"the third chain handed over", lf.c3, pm, 3, 16, "hosta hostb hosta", "migrated-out"},
			{"post-mortem after the teardown, 4 segments", lf.finB3, pm, 4, 20, "hosta hostb hosta hostb", "teardown"},
			{"a handover checked by a destination that knows only the source", lf.c3, verify.Options{PostMortem: true, Identity: lf.vm, AK: akA, LastSegmentOnly: true}, 3, 16, "hosta hostb hosta", "migrated-out"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				rep, err := verify.Verify(tt.ev, tt.opts)
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				var hosts []string
				for _, s := range rep.Segments {
					hosts = append(hosts, s.Host)
				}
				if len(rep.Segments) != tt.segments || rep.Records != tt.records || strings.Join(hosts, " ") != tt.hosts || rep.Segments[len(rep.Segments)-1].End != tt.end {
					t.Fatalf("report: %d segments %v, %d records, end %q", len(rep.Segments), hosts, rep.Records, rep.Segments[len(rep.Segments)-1].End)
				}
				for i, s := range rep.Segments[1:] {
					if prev := rep.Segments[i]; s.First != prev.Last+1 || prev.End != "migrated-out" || s.Start != "migrated-in" {
						t.Fatalf("segments %d and %d do not continue: %+v %+v", i, i+1, prev, s)
					}
				}
				if rep.VM.Name != "vm-mig" {
					t.Fatalf("vm name %q", rep.VM.Name)
				}
				if tt.opts.LastSegmentOnly != rep.Segments[0].Unverified || (rep.Checkpoint == nil) != tt.opts.LastSegmentOnly {
					t.Fatalf("last segment only: unverified %v, checkpoint %v", rep.Segments[0].Unverified, rep.Checkpoint != nil)
				}
			})
		}
	})

	t.Run("incremental", func(t *testing.T) {
		// The verifier kept its checkpoint of B1; the VM then left B: the
		// full evidence of its later life passes against it, the older
		// evidence is a rollback, and a delta from the old host's numbering
		// is refused.
		o := verify.Options{Nonce: lf.nonce, Identity: lf.vm, AKs: lf.aks(), Checkpoint: lf.cpB1}
		// On B, the delta after the checkpoint, streamed or whole, carries
		// the earlier segment and verifies: the earlier segment was
		// verified when the checkpoint was made.
		for _, d := range []*evidence.Evidence{lf.deltaB1, lf.deltaB1b} {
			if len(d.Previous) != 1 || len(d.Records) != 2 || d.From == nil {
				t.Fatalf("the delta has %d previous segments, %d records", len(d.Previous), len(d.Records))
			}
			if _, err := verify.Verify(d, o); err != nil {
				t.Fatalf("delta on B: %v", err)
			}
		}
		drep, _ := verify.Verify(lf.deltaB1, o)
		if drep.Records != 11 || len(drep.Segments) != 2 || !drep.Segments[0].FromCheckpoint || drep.Segments[1].First != 5 || drep.Segments[1].Last != 10 {
			t.Fatalf("delta report: %d records, segments %+v", drep.Records, drep.Segments)
		}
		// A delta whose earlier segment is not the one verified is refused.
		bad := *lf.deltaB1
		bad.Previous = []evidence.Evidence{lf.deltaB1.Previous[0]}
		bad.Previous[0].Host = "not-hosta" // informational, but not what was verified
		if _, err := verify.Verify(&bad, o); err == nil || !strings.Contains(err.Error(), "not the one the checkpoint verified") {
			t.Fatalf("delta with another earlier segment: %v", err)
		}
		rep, err := verify.Verify(lf.evA2, o)
		if err != nil {
			t.Fatalf("full evidence after the migration: %v", err)
		}
		o.Checkpoint = rep.Checkpoint
		if _, err := verify.Verify(lf.evB1, o); err == nil || !strings.Contains(err.Error(), "rollback: the verifier saw 3 segments") {
			t.Fatalf("older evidence against a newer checkpoint: %v", err)
		}
		delta := *lf.evA2
		delta.From = lf.cpB1.Since()
		o.Checkpoint = lf.cpB1
		if _, err := verify.Verify(&delta, o); err == nil || !strings.Contains(err.Error(), "moved to another host since the checkpoint") {
			t.Fatalf("delta across a migration: %v", err)
		}
	})

	t.Run("co-tenant on the destination learns nothing", func(t *testing.T) {
		ev, err := lf.b.m.Evidence(t.Context(), lf.co.ID(), lf.nonce)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := verify.Verify(ev, verify.Options{Nonce: lf.nonce, Identity: lf.co, AK: akB})
		if err != nil {
			t.Fatal(err)
		}
		if len(ev.Previous) != 0 || rep.Records != 7 || len(rep.Segments) != 1 {
			t.Fatalf("co-tenant evidence: %d previous, %d records", len(ev.Previous), rep.Records)
		}
		// Nothing of the migrated VM is in clear in its neighbour's
		// evidence: not its records, its chain, the source's name or AK.
		enc, _ := ev.MarshalBinary()
		fpA := quote.AKFingerprint(akA)
		for _, r := range append(lf.c3.Previous[1].Records, lastSeg(lf.finB3).Records...) {
			if bytes.Contains(enc, r.R) {
				t.Fatal("a record of the migrated VM is in the co-tenant's evidence")
			}
		}
		if bytes.Contains(enc, []byte("hosta")) || bytes.Contains(enc, fpA[:]) || bytes.Contains(enc, []byte("vm-mig")) {
			t.Fatal("the co-tenant's evidence names the migrated VM or its source")
		}
		// Its leaves in B's log are what any other VM's are: entries its
		// neighbour's key finds nothing under.
		keys := lf.co.Keys()
		mine := map[conceal.Digest]bool{}
		for s := range uint64(rep.Records) {
			mine[keys.Tag(s)] = true
		}
		found := 0
		for _, b := range ev.Log {
			for j := range b.Entries.Len() {
				if tg, _ := b.Entries.At(j); mine[tg] {
					found++
				}
			}
		}
		if found != rep.Records {
			t.Fatalf("the co-tenant's key finds %d entries, it has %d records", found, rep.Records)
		}
	})

	t.Run("tags never repeat across hosts", func(t *testing.T) {
		// Record numbers continue, so each tag of the VM appears once in
		// all hosts' logs together: nobody links its segments by a tag.
		seen := map[conceal.Digest]string{}
		for i, seg := range lf.finB3.Segments() {
			for _, b := range seg.Log {
				for j := range b.Entries.Len() {
					tg, _ := b.Entries.At(j)
					key := fmt.Sprintf("%d/%s/%d", i, seg.Host, b.G0+uint64(j))
					if prev, ok := seen[tg]; ok && !sameLog(prev, key, lf.finB3) {
						t.Fatalf("tag at %s repeats at %s", prev, key)
					}
					seen[tg] = key
				}
			}
		}
	})
	t.Run("attacks", func(t *testing.T) {
		segA0, segB1, segA2 := lf.c3.Previous[0], lf.c3.Previous[1], lastSeg(lf.c3)
		segB3 := lastSeg(lf.finB3)
		otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		otherDER, _ := x509.MarshalPKIXPublicKey(&otherKey.PublicKey)
		tests := []struct {
			name string
			ev   *evidence.Evidence
			opts func(*verify.Options)
			want string
		}{
			{"a missing segment in the middle", segs(lf.evA2, &segA0), nil, "missing segment between segments 0 and 1"},
			{"the first segment missing", segs(lf.evB1), nil, "missing segment: the VM's history starts with a migrated-in record (record 5"},
			{"a segment swapped for another VM's (the first)", segs(lf.evB1, &lf.evX.Previous[0]), nil, "segment 0 (host \"hosta\") is another VM's"},
			{"a segment swapped for another VM's (the current)", segs(lastSeg(lf.evX), &segA0), nil, "segment 1 (host \"hostb\") is another VM's"},
			{"a segment that does not start where the previous ended", segs(segB3, &segA0), nil, "segment 1 (host \"hostb\") does not start where segment 0 (host \"hosta\") ended"},
			{"segments reordered", segs(segA2, &segB1, &segA0), nil, "missing segment: the VM's history starts with a migrated-in record"},
			{"an earlier segment that did not end by migration", segs(lf.evB1, lf.evA0), nil, "segment 0 (host \"hosta\") ends with a measurement record, not migrated-out"},
			{"a previous segment that is fresh evidence", segs(lf.evB1, withKind(&segA0, evidence.KindQuote)), nil, "a previous segment must be the final"},
			{"the Prev hash altered", segs(lf.evB1, &segA0), func(*verify.Options) {}, "does not start where segment 0 (host \"hosta\") ended"},
			{"the migrated-in record renumbered", segs(lf.evB1, &segA0), func(*verify.Options) {}, "starts at record 6, but segment 0 (host \"hosta\") ended at record 4: record numbers must continue"},
			{"the migrated-in record's source host altered", segs(lf.evB1, &segA0), func(*verify.Options) {}, "record 5 does not match its commitment"},
			{"a verifier given only one host's AK", lf.evB1, func(o *verify.Options) { o.AKs = []*ecdsa.PublicKey{akA} }, "segment 1 (host \"hostb\"): untrusted AK"},
			{"a segment under a wrong AK", withAK(lf.evB1, 1, otherDER), func(o *verify.Options) { o.AKs = []*ecdsa.PublicKey{akA, &otherKey.PublicKey} }, "segment 1 (host \"hostb\"): untrusted AK"},
			{"a fork inside the chain", nil, nil, "fork: segment 2"},
			{"the last segment only, under the wrong host's AK", lf.c3, func(o *verify.Options) { o.AKs, o.LastSegmentOnly = []*ecdsa.PublicKey{akB}, true }, "segment 2 (host \"hosta\"): untrusted AK"},
			{"the last segment only, an earlier one not chained", segs(segB3, &segA0), func(o *verify.Options) { o.LastSegmentOnly = true }, "does not start where segment 0"},
		}
		// Prev altered and renumbered: rewrite B1's migrated-in record.
		tests[8].ev = rewriteHead(t, lf.evB1, func(in *record.MigratedIn) { in.Prev[0] ^= 1 })
		tests[9].ev = rewriteHead(t, lf.evB1, func(in *record.MigratedIn) { in.Seq++ })
		tests[10].ev = rewriteHead(t, lf.evB1, func(in *record.MigratedIn) { in.SourceHost = "hostz" })
		// The fork: the second segment's chain handed on twice, by a host
		// root who started B over on a fresh store (same TPM, so the same AK
		// the migrated-out record names).
		fork := forkOnB(t, lf)
		tests[13].ev = segs(lastSeg(fork), &segA0, &segB1)
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				o := verify.Options{Nonce: lf.nonce, Identity: lf.vm, AKs: lf.aks(), PostMortem: tt.ev.Kind == evidence.KindFinal}
				if tt.opts != nil {
					tt.opts(&o)
				}
				rep, err := verify.Verify(tt.ev, o)
				if err == nil || !verify.IsRejection(err) || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Verify = %v, want a rejection containing %q", err, tt.want)
				}
				if rep.Trusted || rep.Checkpoint != nil {
					t.Fatal("a rejected chain left a trusted report or a checkpoint")
				}
			})
		}
		t.Run("a fork against the checkpoint", func(t *testing.T) {
			o := verify.Options{Nonce: lf.nonce, Identity: lf.vm, AKs: lf.aks(), Checkpoint: lf.cpB1}
			if _, err := verify.Verify(fork, o); err == nil || !strings.Contains(err.Error(), "fork: segment 1 (host \"hostb\"") {
				t.Fatalf("Verify = %v, want a fork", err)
			}
			// Without the checkpoint, the fork alone is a valid history:
			// only a verifier that saw the other branch can tell.
			o.Checkpoint = nil
			if _, err := verify.Verify(fork, o); err != nil {
				t.Fatalf("the forked branch alone: %v", err)
			}
		})
	})

}

// sameLog reports whether two positions are the same entry of one host's
// log seen in two segments' evidence (segments on one host in one epoch
// share the log's prefix).
func sameLog(a, b string, ev *evidence.Evidence) bool {
	var ia, ib int
	var ha, hb string
	var ga, gb uint64
	fmt.Sscanf(strings.ReplaceAll(a, "/", " "), "%d %s %d", &ia, &ha, &ga)
	fmt.Sscanf(strings.ReplaceAll(b, "/", " "), "%d %s %d", &ib, &hb, &gb)
	segs := ev.Segments()
	return ha == hb && ga == gb && bytes.Equal(segs[ia].Epoch.Record, segs[ib].Epoch.Record)
}

func withKind(ev *evidence.Evidence, kind string) *evidence.Evidence {
	out := *ev
	out.Kind = kind
	return &out
}

// withAK returns ev with segment i's informational AK field replaced.
func withAK(ev *evidence.Evidence, i int, der []byte) *evidence.Evidence {
	s := ev.Segments()
	seg := *s[i]
	seg.AK = der
	prev := s[:i]
	if i < len(s)-1 {
		panic("withAK: only the last segment")
	}
	return segs(&seg, prev...)
}

// rewriteHead returns ev (two segments) with its current segment's
// migrated-in record changed by f, re-encoded canonically.
func rewriteHead(t *testing.T, ev *evidence.Evidence, f func(*record.MigratedIn)) *evidence.Evidence {
	t.Helper()
	s := ev.Segments()
	seg := *s[len(s)-1]
	seg.Records = append([]evidence.Record(nil), seg.Records...)
	rec, err := record.Unmarshal(seg.Records[0].R)
	if err != nil || rec.Kind != record.KindMigratedIn {
		t.Fatalf("head: %v", err)
	}
	f(rec.MigratedIn)
	raw, err := rec.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	seg.Records[0].R = raw
	return segs(&seg, s[:len(s)-1]...)
}

// forkOnB hands the VM's first chain (A0) to B a second time: B's host root
// starts its bridge over on a fresh store, on the same TPM, and accepts
// the old chain again. It returns that branch's fresh evidence.
func forkOnB(t *testing.T, lf *life) *evidence.Evidence {
	t.Helper()
	lf.b.close()
	lf.b.open(filepath.Join(t.TempDir(), "fork.db"))
	if _, err := lf.b.m.MigrateIn(t.Context(), mux.Arrival{Identity: lf.vm, Launch: lf.lvm, SourceHost: "hosta", SourceAK: lf.a.tp.AK(), Chain: lf.c1}); err != nil {
		t.Fatal(err)
	}
	lf.b.add(lf.vm.ID(), "vm-mig", 40, 42)
	return lf.b.fresh(lf.vm.ID(), lf.nonce)
}

// TestMigrationVTPM: a vTPM VM's vPCRs move in its migrated-in record: the
// destination's mux gives the bridge what it restores the vTPM from (the
// snapshot and this segment's events, replaying to the guest's PCRs), the
// verifier replays the events of every host through it, and a snapshot
// that is not the replay of the source's events is rejected.
func TestMigrationVTPM(t *testing.T) {
	ctx := t.Context()
	a, b := newMHost(t, "hosta"), newMHost(t, "hostb")
	banks := []vpcr.Alg{vpcr.SHA256}
	ext := func(seq uint64, pcr int, v byte) vpcr.Event {
		return vpcr.Event{Seq: seq, Kind: vpcr.KindExtend, Command: 0x182, PCR: pcr, Digests: []vpcr.Digest{{Alg: vpcr.SHA256, Value: bytes.Repeat([]byte{v}, 32)}}}
	}
	onA := []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Command: 0x144, Banks: banks}, ext(3, 0, 1), ext(4, 7, 2)}
	onB := []vpcr.Event{ext(5, 1, 3), ext(6, 0, 4)}
	tests := []struct {
		name  string
		alter func(*vpcr.Snapshot)
		want  string
	}{
		{"the vPCRs move with the VM", nil, ""},
		{"a vPCR altered in transit", func(sn *vpcr.Snapshot) { sn.Values[0].PCRs[7][0] ^= 1 }, "not the replay of its vTPM events on the earlier hosts"},
		{"an event dropped in transit", func(sn *vpcr.Snapshot) { sn.Seq-- }, "not the replay"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := mux.Launch{UUID: [16]byte{0x15, byte(i)}, Name: fmt.Sprint("vm-vtpm-", i), VTPMBanks: []uint16{uint16(vpcr.SHA256)}}
			ident, err := a.m.NewVM(ctx, l)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range onA {
				if err := a.m.Journal(ident.ID(), false).Append(ctx, e); err != nil {
					t.Fatal(err)
				}
			}
			st, err := vpcr.Replay(banks, onA)
			if err != nil {
				t.Fatal(err)
			}
			sn := st.Snapshot()
			if tt.alter != nil {
				tt.alter(sn)
			}
			move(t, a, b, ident, l, sn, a.tp.AK())
			for _, e := range onB {
				if err := b.m.Journal(ident.ID(), false).Append(ctx, e); err != nil {
					t.Fatal(err)
				}
			}
			// What the destination bridge restores the vTPM from.
			start, err := b.m.VTPMStart(ident.ID())
			if err != nil || start == nil {
				t.Fatalf("VTPMStart: %v", err)
			}
			past, err := b.m.TPMEvents(ident.ID())
			if err != nil || len(past) != len(onB) {
				t.Fatalf("TPMEvents on B: %d events, %v", len(past), err)
			}
			ev := b.fresh(ident.ID(), []byte("a nonce of the vTPM VM's verifier"))
			rep, err := verify.Verify(ev, verify.Options{Nonce: []byte("a nonce of the vTPM VM's verifier"), Identity: ident, AKs: []*ecdsa.PublicKey{a.tp.AK(), b.tp.AK()}})
			if tt.want != "" {
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Verify = %v, want a rejection containing %q", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			restored, err := vpcr.ReplayFrom(nil, start, past)
			if err != nil {
				t.Fatal(err)
			}
			whole, _ := vpcr.Replay(banks, append(append([]vpcr.Event(nil), onA...), onB...))
			for p := range vpcr.NumPCRs {
				want := fmt.Sprintf("%x", whole.Read(vpcr.SHA256, p))
				if rep.VTPM == nil || rep.VTPM.PCRs["sha256"][p] != want || fmt.Sprintf("%x", restored.Read(vpcr.SHA256, p)) != want {
					t.Fatalf("vPCR %d: verifier %v, restored %x, want %s", p, rep.VTPM, restored.Read(vpcr.SHA256, p), want)
				}
			}
			if rep.VTPM.Events != len(onA)+len(onB) {
				t.Fatalf("the verifier replayed %d vTPM events, want %d", rep.VTPM.Events, len(onA)+len(onB))
			}
			// A verifier of B's segment alone replays B's events from the
			// vPCRs the VM arrived with, to the same values.
			only, err := verify.Verify(ev, verify.Options{Nonce: []byte("a nonce of the vTPM VM's verifier"), Identity: ident, AK: b.tp.AK(), LastSegmentOnly: true})
			if err != nil || only.VTPM == nil || only.VTPM.Events != len(onB) || !slices.Equal(only.VTPM.PCRs["sha256"], rep.VTPM.PCRs["sha256"]) {
				t.Fatalf("B's segment alone: %v", err)
			}
		})
	}
}
