package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime/pprof"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// p3VMs is how many VMs the attested log holds (verifiers beyond it attest
// the same VMs again), and p3Records how many measurements each has.
const (
	p3VMs     = 100
	p3Records = 10
)

// sample is one evidence response kept for verification after the run.
type sample struct {
	nonce []byte
	vm    int
	resp  *wire.EvidenceResponse
	cp    *verify.Checkpoint // the checkpoint the request was incremental from, or nil
}

type attestResult struct {
	rate     float64 // responses per second, over whole quote cycles (cycleRate)
	winRate  float64 // responses per second counted in the fixed window
	lat      []time.Duration
	verified int
	batched  int
	quotes   uint64
	q        time.Duration // mean TPM time of a quote (its PCR read and the quote)
	cpu      time.Duration // process CPU per response (bridge and verifiers)
	evBytes  int
}

// runAttest runs one P3 measurement: verifiers closed-loop verifiers over
// bridge sessions, asking for full evidence, or with incr for incremental
// evidence from a checkpoint of their VM (each VM's checkpoint is made once,
// before the run, by verifying its full evidence).
func (e *env) runAttest(ctx context.Context, kind string, verifiers int, noBatch, incr bool, warmMax, dur time.Duration) (*attestResult, error) {
	nVM := min(verifiers, p3VMs)
	// The log is filled, and the checkpoints made, with batched quotes
	// (100 checkpoints one quote each would take 20 s on the hardware
	// profile); a baseline run then reopens the multiplexer without.
	r, err := e.openMuxRig(ctx, kind, "attest-", nVM, nil, mux.Config{})
	if err != nil {
		return nil, err
	}
	defer r.close()
	if err := fillVMs(ctx, r.m, e.pool, r.idents, p3Records); err != nil {
		return nil, err
	}
	cps := make([]*verify.Checkpoint, nVM)
	if incr {
		// Concurrently: the requests share quotes.
		ak := r.rt.TPM.AK()
		var wg sync.WaitGroup
		errs := make([]error, nVM)
		for vm := range cps {
			wg.Go(func() {
				nonce := make([]byte, 32)
				rand.Read(nonce)
				ev, err := r.m.Evidence(ctx, r.idents[vm].ID(), nonce)
				if err != nil {
					errs[vm] = err
					return
				}
				rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: r.idents[vm], AK: ak, PCR: mux.DefaultPCR})
				if err != nil || !rep.Trusted || rep.Checkpoint == nil {
					errs[vm] = fmt.Errorf("checkpoint of VM %d: %v (%s)", vm, err, rep.Reason)
					return
				}
				cps[vm] = rep.Checkpoint
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
	}
	if noBatch {
		if err := r.reopen(ctx, mux.Config{NoQuoteBatching: true}); err != nil {
			return nil, err
		}
	}
	br := &bridge.Bridge{Mux: r.m, Log: quiet}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()

	a := &attestLoad{got: make([]atomic.Bool, verifiers), errc: make(chan error, verifiers), cps: cps, early: e.early}
	conns := make([]net.Conn, verifiers)
	var serveWG, cwg sync.WaitGroup
	for i := range verifiers {
		g, b := net.Pipe()
		conns[i] = g
		vm := i % nVM
		id := r.idents[vm].ID()
		serveWG.Go(func() { br.Serve(sctx, id, b, false) })
		cwg.Go(func() { a.verifier(sctx, i, vm, g) })
	}
	a.warm(warmMax)
	// Not m.Status(): it takes the commit lock, behind every queued quote.
	q0, qd0, qn0, cpu0 := r.rt.g.quotes.Load(), r.rt.g.quoted.Load(), r.rt.g.quoteNanos.Load(), cpuTime()
	t0 := time.Now()
	a.measuring.Store(true)
	time.Sleep(dur)
	a.measuring.Store(false)
	n := a.done.Load()
	el := time.Since(t0)
	q1, qd1, qn1, cpu1 := r.rt.g.quotes.Load(), r.rt.g.quoted.Load(), r.rt.g.quoteNanos.Load(), cpuTime()

	r.rt.g.stop()
	cancel()
	for _, c := range conns {
		c.Close()
	}
	cwg.Wait()
	serveWG.Wait()
	close(a.errc)
	var errs []error
	for err := range a.errc {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	res := &attestResult{rate: float64(n) / el.Seconds(), lat: a.lats, quotes: q1 - q0, evBytes: int(a.evBytes.Load())}
	res.winRate = res.rate
	if r, ok := cycleRate(r.rt.g.quoteStarts(t0, t0.Add(el)), a.ends); ok {
		res.rate = r
	}
	if qd1 > qd0 {
		res.q = time.Duration((qn1 - qn0) / int64(qd1-qd0))
	}
	if n > 0 {
		res.cpu = (cpu1 - cpu0) / time.Duration(n)
	}
	// The batched evidence is real: every sampled response verifies
	// against the TPM's AK, the verifier's nonce and the VM's identity.
	ak := r.rt.TPM.AK()
	for _, s := range a.samples {
		batched, err := verifySample(s, r.idents[s.vm], ak)
		if err != nil {
			return nil, fmt.Errorf("sampled evidence response for VM %d does not verify: %w", s.vm, err)
		}
		res.verified++
		if batched {
			res.batched++
		}
	}
	return res, nil
}

// attestLoad is the verifiers of one P3 run and what they measured.
type attestLoad struct {
	measuring atomic.Bool
	done      atomic.Int64
	seen      atomic.Int64
	kept      atomic.Int64
	evBytes   atomic.Int64
	early     bool          // the verifiers ask for early evidence (wire.EvidenceRequest.Early)
	got       []atomic.Bool // verifier i has had an answer
	errc      chan error
	cps       []*verify.Checkpoint // per VM: the checkpoint incremental requests start from, or nil

	mu      sync.Mutex
	samples []sample
	lats    []time.Duration
	ends    []time.Time // when each measured response arrived
}

// cycleRate is the responses per second over whole quote cycles: those
// that arrived from the first quote that began in the window to the last
// one, over that time. Responses arrive in a burst after each quote, one
// burst per cycle of about Q plus the round trip; a fixed window holds a
// whole number of bursts (13 or 14 of about 225 ms in 3 s at 1000
// verifiers), so the count in it moves in steps of a burst, 7% of the rate
// there. ok is false with fewer than three quotes in the window.
func cycleRate(starts, ends []time.Time) (float64, bool) {
	if len(starts) < 3 {
		return 0, false
	}
	a, b := starts[0], starts[len(starts)-1]
	n := 0
	for _, t := range ends {
		if !t.Before(a) && t.Before(b) {
			n++
		}
	}
	return float64(n) / b.Sub(a).Seconds(), true
}

// verifier is verifier i: it asks for VM vm's evidence over g, one
// request after the other, until ctx ends or the connection does. It reads
// every response whole and checks its frame and request ID (frameReader);
// the responses it keeps as samples it decodes in full, to be verified
// after the run.
func (a *attestLoad) verifier(ctx context.Context, i, vm int, g net.Conn) {
	fr := newFrameReader(g)
	cp := a.cps[vm]
	var since *wire.Since
	if cp != nil {
		s := cp.Since()
		since = &wire.Since{Batch: s.Batch, Records: s.Records}
	}
	for reqID := uint64(1); ctx.Err() == nil; reqID++ {
		nonce := make([]byte, 32)
		rand.Read(nonce)
		t := time.Now()
		req, err := wire.Encode(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: reqID, Nonce: nonce, Since: since, Early: a.early})
		if err != nil {
			a.errc <- fmt.Errorf("verifier %d: %w", i, err)
			return
		}
		if _, err := g.Write(req); err != nil {
			return
		}
		// Whether to keep this response as a sample is known before it
		// is read: an early part's bytes are copied only then.
		keep := a.measuring.Load() && a.sample()
		f, early, err := fr.readResponse(reqID, keep)
		if err != nil {
			var we *wire.Error
			if errors.As(err, &we) || (!errors.Is(err, io.EOF) && !errors.Is(err, io.ErrClosedPipe)) {
				if a.measuring.Load() {
					a.errc <- fmt.Errorf("verifier %d: %w", i, err)
				}
			}
			return
		}
		a.got[i].Store(true)
		if !a.measuring.Load() {
			continue
		}
		s := sample{nonce: nonce, vm: vm, cp: cp}
		if keep {
			if s.resp, err = decodeFull(f, early); err != nil {
				a.errc <- fmt.Errorf("verifier %d: %w", i, err)
				return
			}
		}
		a.record(time.Since(t), keep, s)
	}
}

// sample reports whether the next measured response is one to keep and
// verify: the first 16, then every 53rd, at most 48.
func (a *attestLoad) sample() bool {
	n := a.seen.Add(1)
	return (n <= 16 || n%53 == 0) && a.kept.Add(1) <= 48
}

// record counts one answer measured, and keeps it if it is a sample.
func (a *attestLoad) record(lat time.Duration, keep bool, s sample) {
	a.done.Add(1)
	end := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.lats = append(a.lats, lat)
	a.ends = append(a.ends, end)
	if keep {
		a.evBytes.Store(int64(len(s.resp.Evidence)))
		a.samples = append(a.samples, s)
	}
}

// warm waits until every verifier has had an answer, or warmMax.
func (a *attestLoad) warm(warmMax time.Duration) {
	deadline := time.Now().Add(warmMax)
	for time.Now().Before(deadline) {
		all := true
		for i := range a.got {
			if !a.got[i].Load() {
				all = false
				break
			}
		}
		if all {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func verifySample(s sample, ident *conceal.Identity, ak *ecdsa.PublicKey) (bool, error) {
	if s.resp.UUID != ident.UUID || s.resp.Instance != ident.Instance || s.resp.Key != [32]byte(ident.Key) {
		return false, errors.New("response carries another identity")
	}
	ev, err := evidence.Decode(s.resp.Evidence)
	if err != nil {
		return false, err
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: s.nonce, Identity: ident, AK: ak, PCR: mux.DefaultPCR, Checkpoint: s.cp})
	if err != nil {
		return false, err
	}
	if !rep.Trusted || !rep.Fresh {
		return false, fmt.Errorf("report not trusted and fresh: %s", rep.Reason)
	}
	return rep.Batched, nil
}

// fillVMs gives every VM n measurement records.
func fillVMs(ctx context.Context, m *mux.Mux, p *pool, idents []*conceal.Identity, n int) error {
	var ts []*mux.Ticket
	for i, id := range idents {
		recs := make([]*record.Record, n)
		for j := range recs {
			recs[j] = p.record(i*n+j, uint64(j), "bench-boot")
		}
		t, err := m.Submit(id.ID(), recs...)
		if err != nil {
			return err
		}
		ts = append(ts, t)
	}
	for _, t := range ts {
		if _, err := t.Wait(ctx); err != nil {
			return err
		}
	}
	return nil
}

// benchAttest runs P3.
func (e *env) benchAttest(ctx context.Context) error {
	for _, kind := range e.tpms {
		dur := 1500 * time.Millisecond
		if kind == kindHW {
			dur = 3 * time.Second // the baseline serves 5 requests/s
		}
		warm := time.Second
		if e.quick {
			dur /= 2
			warm /= 2
		}
		if e.dur > 0 {
			dur = e.dur
		}
		for _, evMode := range e.evModes {
			incr := evMode == "incremental"
			for _, n := range e.verList {
				var bat, one []*attestResult
				for r := 0; r < e.runs; r++ {
					for _, noBatch := range []bool{false, true} {
						if ctx.Err() != nil {
							return ctx.Err()
						}
						var res *attestResult
						var err error
						labels := pprof.Labels("exp", "P3", "tpm", kind, "verifiers", fmt.Sprint(n), "evidence", evMode, "mode", map[bool]string{true: "one-quote-per-request", false: "batched"}[noBatch])
						pprof.Do(ctx, labels, func(ctx context.Context) {
							res, err = e.runAttest(ctx, kind, n, noBatch, incr, warm, dur)
						})
						if err != nil {
							return fmt.Errorf("%s, %d verifiers, %s evidence, NoQuoteBatching %v: %w", kind, n, evMode, noBatch, err)
						}
						mode := "batched quotes"
						if noBatch {
							mode = "one quote per request"
							one = append(one, res)
						} else {
							bat = append(bat, res)
						}
						e.logf("  P3 %-10s %4d verifiers %-11s %-21s %s (window %s), %d quotes of %v, %.0f%% of N/Q, CPU %v/response, evidence %s, %d sampled responses verified (%d batched)",
							tpmLabel(kind), n, evMode, mode, fmtRate(res.rate, "req/s"), fmtRate(res.winRate, "req/s"), res.quotes, res.q.Round(10*time.Microsecond), 100*res.rate*res.q.Seconds()/float64(n),
							res.cpu.Round(time.Microsecond), fmtBytes(float64(res.evBytes)), res.verified, res.batched)
					}
				}
				b, o := medianOf(bat, func(r *attestResult) float64 { return r.rate }), medianOf(one, func(r *attestResult) float64 { return r.rate })
				verified, batched := 0, 0
				for _, r := range append(bat, one...) {
					verified += r.verified
				}
				for _, r := range bat {
					batched += r.batched
				}
				// The closed-loop ideal is one quote answering every verifier:
				// N per quote time Q. Q is the mean TPM time of a quote (its PCR
				// read and TPM2_Quote), the smaller of the batched runs' and the
				// one-quote-per-request runs' (medians) of the same invocation,
				// so that a quote slowed by load never flatters the percentage.
				// The baseline's rate (≈ 1/Q, but counted in whole responses
				// over a few seconds) is the ratio's.
				qOf := func(r *attestResult) float64 { return float64(r.q) }
				q := time.Duration(min(medianOf(one, qOf), medianOf(bat, qOf)))
				ideal := float64(n) / q.Seconds()
				cpu := time.Duration(medianOf(bat, func(r *attestResult) float64 { return float64(r.cpu) }))
				cs := fmt.Sprintf("attestation, %d verifiers", n)
				if incr {
					cs += ", incremental"
				}
				row := row{ID: "P3", Case: cs, TPM: tpmLabel(kind),
					Value: fmt.Sprintf("%s (%.0f%% of N/Q)", fmtRate(b, "req/s"), 100*b/ideal), Baseline: fmtRate(o, "req/s") + " (1 quote/req)", V: b, B: o, R: b / o, Ratio: fmtRatio(b / o),
					Notes: fmt.Sprintf("%d sampled responses verified with verify.Verify, %d of them from batched quotes; Q = %v, closed-loop ideal N/Q = %s; CPU %v per response; early evidence %s; rate over whole quote cycles (counted in the fixed window: %s)", verified, batched, q.Round(10*time.Microsecond), fmtRate(ideal, "req/s"), cpu.Round(time.Microsecond), yesNo(e.early), fmtRate(medianOf(bat, func(r *attestResult) float64 { return r.winRate }), "req/s"))}
				if kind == kindHW && n >= 10 {
					row.Target, row.Met = "≥90% of N/Q", yesNo(b >= 0.9*ideal)
				} else {
					row.Target, row.Met = "-", "-"
				}
				e.add(row)
			}
		}
	}
	return nil
}
