package main

import (
	"context"
	"fmt"
	"runtime/pprof"
	"slices"
	"time"
)

// P2's paced load: every guest sends a frame of p2Frame entries every
// p2Pace (80 measurements/s per VM, 80k/s for 1000 VMs).
const (
	p2Frame = 8
	p2Pace  = 100 * time.Millisecond
)

type ingestPair struct{ gc, base []*ingestResult }

// runPairs runs group commit and one extend per record (MaxBatch 1) e.runs
// times each, interleaved so load drift hits both alike.
func (e *env) runPairs(ctx context.Context, tag, kind string, n int, fr *frames, pace, warm, dur time.Duration) (*ingestPair, error) {
	p := &ingestPair{}
	for r := 0; r < e.runs; r++ {
		for _, mb := range []int{e.maxBatch, 1} {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			w := warm
			if mb == 1 {
				// The baseline saturates at once; waiting for every
				// guest's first ack could take minutes.
				w = min(warm, 500*time.Millisecond)
			}
			var res *ingestResult
			var err error
			// Profile labels tell the runs apart: go tool pprof
			// -tagfocus=mode=group-commit cpu-P1.pprof.
			labels := pprof.Labels("exp", tag, "tpm", kind, "vms", fmt.Sprint(n), "mode", map[bool]string{true: "per-record", false: "group-commit"}[mb == 1])
			pprof.Do(ctx, labels, func(ctx context.Context) {
				res, err = e.runIngest(ctx, kind, n, mb, fr, pace, w, dur)
			})
			if err != nil {
				return nil, fmt.Errorf("%s, %d VMs, MaxBatch %d: %w", kind, n, mb, err)
			}
			mode := "group commit"
			if mb == 1 {
				mode = "one extend per record"
				p.base = append(p.base, res)
			} else {
				p.gc = append(p.gc, res)
			}
			p50, p99, how := latencyOf([]*ingestResult{res}, n)
			e.logf("  %s %-10s %4d VMs %-21s %s, %d acks in window, p50 %s p99 %s (%s), %.0f records/batch, extend %s, CPU %s/record; sessions set up in %s",
				tag, tpmLabel(kind), n, mode, fmtRate(res.rate, "rec/s"), len(res.lat), fmtDur(time.Duration(p50)),
				fmtDur(time.Duration(p99)), how, res.batch, fmtDur(res.extend), fmtDur(res.cpuPerRec), fmtDur(res.connect))
		}
	}
	return p, nil
}

// latencyOf returns the ack latency's p50 and p99 over the acks of all
// runs pooled, when every run was in a steady state; otherwise the system
// was saturated (windows full, a growing backlog), and the latency is the
// closed-loop steady state by Little's law: records in flight /
// throughput (the median over runs).
func latencyOf(rs []*ingestResult, vms int) (p50, p99 float64, how string) {
	steady := true
	var all []time.Duration
	for _, r := range rs {
		steady = steady && r.steady
		all = append(all, r.lat...)
	}
	if steady {
		slices.Sort(all)
		return float64(percentile(all, 50)), float64(percentile(all, 99)), "measured"
	}
	l := medianOf(rs, func(r *ingestResult) float64 {
		return float64(vms*r.inflight) / r.rate * float64(time.Second)
	})
	return l, l, "saturated: Little's law"
}

func fmtLatency(p50, p99 float64, how string) string {
	if how == "measured" {
		return fmt.Sprintf("%s / %s", fmtDur(time.Duration(p50)), fmtDur(time.Duration(p99)))
	}
	return fmt.Sprintf("≈%s (saturated)", fmtDur(time.Duration(p99)))
}

// benchIngest runs P1 (throughput, every guest streaming with a full
// window) and P2 (ack latency at a paced load).
func (e *env) benchIngest(ctx context.Context) error {
	dur := time.Second
	if e.quick {
		dur = 500 * time.Millisecond
	}
	if e.dur > 0 {
		dur = e.dur
	}
	fr8, err := e.pool.frames(p2Frame)
	if err != nil {
		return err
	}
	p1 := map[string]map[int]*ingestPair{}
	p2 := map[string]map[int]*ingestPair{}
	for _, kind := range e.tpms {
		p1[kind], p2[kind] = map[int]*ingestPair{}, map[int]*ingestPair{}
		for _, n := range e.vmsList {
			warm := time.Second
			if n >= 1000 {
				warm = 3 * time.Second
			}
			if e.quick {
				warm /= 2
			}
			if p1[kind][n], err = e.runPairs(ctx, "P1", kind, n, e.frames, 0, warm, dur); err != nil {
				return err
			}
			// P2's percentiles pool the acks of all runs; a few VMs send
			// few frames, so their runs are longer, for about 200 acks.
			perSec := float64(n) * float64(time.Second/p2Pace)
			dur2 := time.Duration(200 / perSec / float64(e.runs) * float64(time.Second))
			dur2 = min(max(dur, dur2), map[bool]time.Duration{false: 8 * time.Second, true: 2 * time.Second}[e.quick])
			if e.dur > 0 {
				dur2 = e.dur
			}
			if p2[kind][n], err = e.runPairs(ctx, "P2", kind, n, fr8, p2Pace, warm, dur2); err != nil {
				return err
			}
		}
	}
	for _, kind := range e.tpms {
		for _, n := range e.vmsList {
			p := p1[kind][n]
			gc, base := medianOf(p.gc, func(r *ingestResult) float64 { return r.rate }), medianOf(p.base, func(r *ingestResult) float64 { return r.rate })
			r := row{ID: "P1", Case: fmt.Sprintf("ingest, %d VMs streaming", n), TPM: tpmLabel(kind),
				Value: fmtRate(gc, "rec/s"), Baseline: fmtRate(base, "rec/s") + " (1 extend/rec)", V: gc, B: base, R: gc / base, Ratio: fmtRatio(gc / base)}
			l50, l99, lhow := latencyOf(p.gc, n)
			b50, b99, bhow := latencyOf(p.base, n)
			r.Notes = fmt.Sprintf("group commit: %.0f records/batch, extend %s, ack latency %s; baseline: extend %s, ack latency %s",
				medianOf(p.gc, func(r *ingestResult) float64 { return r.batch }),
				fmtDur(time.Duration(medianOf(p.gc, func(r *ingestResult) float64 { return float64(r.extend) }))),
				fmtLatency(l50, l99, lhow),
				fmtDur(time.Duration(medianOf(p.base, func(r *ingestResult) float64 { return float64(r.extend) }))),
				fmtLatency(b50, b99, bhow))
			switch kind {
			case kindHW:
				r.Target, r.Met = "≥100× baseline", yesNo(gc/base >= 100)
			case kindSim:
				r.Target, r.Met = "≥100k rec/s", yesNo(gc >= 100_000)
			default:
				r.Target, r.Met = "-", "-"
			}
			e.add(r)
		}
	}
	for _, kind := range e.tpms {
		for _, n := range e.vmsList {
			p := p2[kind][n]
			p50, p99, how := latencyOf(p.gc, n)
			b50, b99, bhow := latencyOf(p.base, n)
			ext := medianOf(p.gc, func(r *ingestResult) float64 { return float64(r.extend) })
			target := time.Duration(ext) + e.fsync + time.Millisecond
			r := row{ID: "P2", Case: fmt.Sprintf("ack latency p50/p99, %d VMs × %d rec/s", n, int(p2Frame*time.Second/p2Pace)), TPM: tpmLabel(kind),
				Value: fmtLatency(p50, p99, how), Baseline: fmtLatency(b50, b99, bhow), V: p99, B: b99, R: b99 / p99, Ratio: fmtRatio(b99 / p99),
				Target: fmt.Sprintf("p99 ≤ %s", fmtDur(target)), Met: yesNo(how == "measured" && p99 <= float64(target))}
			acks := 0
			for _, g := range p.gc {
				acks += len(g.lat)
			}
			r.Notes = fmt.Sprintf("frames of %d entries every %s per VM, %d acks; group commit %.0f records/batch at %s; target = extend %s + fsync %s + 1ms",
				p2Frame, p2Pace, acks, medianOf(p.gc, func(r *ingestResult) float64 { return r.batch }),
				fmtRate(medianOf(p.gc, func(r *ingestResult) float64 { return r.rate }), "rec/s"), fmtDur(time.Duration(ext)), fmtDur(e.fsync))
			var paced [][]time.Duration
			for _, g := range p.gc {
				paced = append(paced, g.paced)
			}
			r.Notes += "; " + pacedNote(paced, e.fsync, func(fs time.Duration) time.Duration { return time.Duration(ext) + fs + time.Millisecond }, time.Duration(p99))
			if bhow != "measured" {
				r.Ratio = "> " + r.Ratio
			}
			e.add(r)
		}
	}
	return nil
}

// medianOf is the median of f over results.
func medianOf[T any](xs []T, f func(T) float64) float64 {
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	return median(v)
}
