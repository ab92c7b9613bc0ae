package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// p4VMs fill the log; VM 0 is the one under test and holds 1/p4VMs of the
// records, the others the rest.
const (
	p4VMs   = 100
	p4Delta = 1000
)

// logBuilder grows one log quickly: a store without fsync and the default
// batch size (so batches of up to 8192 records), many submissions in
// flight.
type logBuilder struct {
	m      *mux.Mux
	p      *pool
	ids    []conceal.Digest
	counts []int // records per VM so far (measurements, genesis excluded)
	total  int
}

// grow adds records until the log holds total measurement records, of
// which VM 0 holds total/p4VMs.
func (lb *logBuilder) grow(ctx context.Context, total int) error {
	want0 := total / len(lb.ids)
	need := make([]int, len(lb.ids))
	need[0] = max(0, want0-lb.counts[0])
	rest := total - lb.total - need[0]
	for i := 1; i < len(need) && rest > 0; i++ {
		need[i] = rest / (len(need) - 1)
	}
	for i := 1; i < len(need) && rest > 0; i++ {
		rest -= need[i]
	}
	for i := 1; rest > 0; i = i%(len(need)-1) + 1 {
		need[i]++
		rest--
	}
	return lb.add(ctx, need)
}

// add submits need[i] more records for VM i, in chunks, several chunks in
// flight per worker.
func (lb *logBuilder) add(ctx context.Context, need []int) error {
	const chunk = 512
	workers := 4
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Go(func() {
			var pending []*mux.Ticket
			for i := w; i < len(need); i += workers {
				id := lb.ids[i]
				for left := need[i]; left > 0; {
					n := min(chunk, left)
					recs := make([]*record.Record, n)
					for j := range recs {
						idx := uint64(lb.counts[i] + j)
						recs[j] = lb.p.record(i*7919+int(idx), idx, "bench-boot")
					}
					t, err := lb.m.Submit(id, recs...)
					if err != nil {
						errs[w] = err
						return
					}
					pending = append(pending, t)
					lb.counts[i] += n
					left -= n
					if len(pending) >= 8 {
						if _, err := pending[0].Wait(ctx); err != nil {
							errs[w] = err
							return
						}
						pending = pending[1:]
					}
				}
			}
			for _, t := range pending {
				if _, err := t.Wait(ctx); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	for _, n := range need {
		lb.total += n
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// verifyBytes is what a tenant's verifier does with evidence it received:
// decode it and verify it. It returns the time taken and the report.
func verifyBytes(raw []byte, opts verify.Options) (time.Duration, *verify.Report, error) {
	start := time.Now()
	ev, err := evidence.Decode(raw)
	if err != nil {
		return 0, nil, err
	}
	rep, err := verify.Verify(ev, opts)
	d := time.Since(start)
	if err != nil {
		return d, rep, err
	}
	return d, rep, nil
}

// benchVerifier runs P4.
func (e *env) benchVerifier(ctx context.Context) error {
	r, err := e.openMuxRig(ctx, kindSim, "verifier-", p4VMs, &logstore.Options{NoSync: true}, mux.Config{})
	if err != nil {
		return err
	}
	defer r.close()
	lb := &logBuilder{m: r.m, p: e.pool, counts: make([]int, len(r.idents))}
	for _, id := range r.idents {
		lb.ids = append(lb.ids, id.ID())
	}
	for _, size := range e.p4Sizes {
		if err := e.p4Size(ctx, r, lb, size); err != nil {
			return err
		}
	}
	return nil
}

// p4Size grows the log to size records and measures the full and the
// incremental verification of the first VM's evidence there.
func (e *env) p4Size(ctx context.Context, r *muxRig, lb *logBuilder, size int) error {
	m, test, ak := r.m, r.idents[0], r.rt.TPM.AK()
	opts := func(nonce []byte) verify.Options {
		return verify.Options{Nonce: nonce, Identity: test, AK: ak, PCR: mux.DefaultPCR}
	}
	t := time.Now()
	if err := lb.grow(ctx, size); err != nil {
		return err
	}
	e.logf("  P4 log of %d records built in %s (VM under test: %d records)", lb.total, time.Since(t).Round(time.Millisecond), lb.counts[0])
	// The verifier's checkpoint at this size.
	n0 := newNonce()
	raw0, _, err := evidenceBytes(ctx, m, test, n0, nil)
	if err != nil {
		return err
	}
	_, rep0, err := verifyBytes(raw0, opts(n0))
	if err != nil {
		return fmt.Errorf("full evidence at %d records does not verify: %w", size, err)
	}
	cp := rep0.Checkpoint
	// 1k new records of the VM under test.
	need := make([]int, len(r.idents))
	need[0] = p4Delta
	if err := lb.add(ctx, need); err != nil {
		return err
	}
	nf, nd := newNonce(), newNonce()
	rawFull, batches, err := evidenceBytes(ctx, m, test, nf, nil)
	if err != nil {
		return err
	}
	rawDelta, _, err := evidenceBytes(ctx, m, test, nd, cp.Since())
	if err != nil {
		return err
	}
	want := lb.counts[0] + 1
	var full, inc []float64
	for range e.runs {
		settle()
		d, err := verifyCount(rawFull, opts(nf), want)
		if err != nil {
			return fmt.Errorf("full verification: %w", err)
		}
		full = append(full, float64(d))
		settle() // the full verification's garbage is not the delta's to collect
		o := opts(nd)
		o.Checkpoint = cp
		d, err = verifyCount(rawDelta, o, want)
		if err != nil {
			return fmt.Errorf("incremental verification: %w", err)
		}
		inc = append(inc, float64(d))
	}
	e.p4Rows(lb, size, median(full), median(inc), len(rawFull), len(rawDelta), batches)
	return nil
}

// p4Rows reports P4's measurements at one log size: the medians of the
// full (fm) and incremental (im) verification and the evidence sizes.
func (e *env) p4Rows(lb *logBuilder, size int, fm, im float64, fullBytes, deltaBytes, batches int) {
	e.logf("  P4 %d records: full %s (%s), incremental %s (%s)", lb.total, fmtDur(time.Duration(fm)), fmtBytes(float64(fullBytes)), fmtDur(time.Duration(im)), fmtBytes(float64(deltaBytes)))
	label := sizeLabel(size)
	fr := row{ID: "P4", Case: fmt.Sprintf("full verify, log %s (VM has %d)", label, lb.counts[0]+1), TPM: "-",
		Value: fmtDur(time.Duration(fm)), Baseline: "-", Ratio: "-", V: fm,
		Notes: fmt.Sprintf("decode + verify.Verify of %s of evidence (%d batches)", fmtBytes(float64(fullBytes)), batches)}
	if size >= 1_000_000 {
		fr.Target, fr.Met = "≤ 500ms", yesNo(fm <= float64(500*time.Millisecond))
	} else {
		fr.Target, fr.Met = "-", "-"
	}
	e.add(fr)
	e.add(row{ID: "P4", Case: fmt.Sprintf("incremental verify, log %s + 1k", label), TPM: "-",
		Value: fmtDur(time.Duration(im)), Baseline: fmtDur(time.Duration(fm)) + " (full)", Ratio: fmtRatio(fm / im), V: im, B: fm, R: fm / im,
		Target: "≤ 10ms", Met: yesNo(im <= float64(10*time.Millisecond))})
	e.add(row{ID: "P4", Case: fmt.Sprintf("evidence bytes, log %s", label), TPM: "-",
		Value: fmtBytes(float64(deltaBytes)) + " (delta)", Baseline: fmtBytes(float64(fullBytes)) + " (full)",
		Ratio: fmtRatio(float64(fullBytes) / float64(deltaBytes)), V: float64(deltaBytes), B: float64(fullBytes),
		R: float64(fullBytes) / float64(deltaBytes), Target: "-", Met: "-"})
}

// newNonce draws a verifier's nonce.
func newNonce() []byte {
	n := make([]byte, 32)
	rand.Read(n)
	return n
}

// evidenceBytes is VM ident's fresh evidence for nonce (the delta after
// since, when set) in its binary form, and how many batches it holds.
func evidenceBytes(ctx context.Context, m *mux.Mux, ident *conceal.Identity, nonce []byte, since *evidence.Since) ([]byte, int, error) {
	ev, err := m.EvidenceSince(ctx, ident.ID(), nonce, since)
	if err != nil {
		return nil, 0, err
	}
	raw, err := ev.MarshalBinary()
	return raw, len(ev.Log), err
}

// verifyCount times the verification of raw and checks it found want
// records.
func verifyCount(raw []byte, o verify.Options, want int) (time.Duration, error) {
	d, rep, err := verifyBytes(raw, o)
	if err != nil {
		return 0, fmt.Errorf("evidence does not verify: %w", err)
	}
	if rep.Records != want {
		return 0, fmt.Errorf("found %d records, want %d", rep.Records, want)
	}
	return d, nil
}

func sizeLabel(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}
