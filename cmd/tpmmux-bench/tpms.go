package main

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/hwprofile"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// TPM kinds the benchmark runs on.
const (
	kindSim   = "sim"   // the in-process reference simulator
	kindSwtpm = "swtpm" // a swtpm process over TCP, started per run
	kindHW    = "hw"    // the simulator served at a discrete TPM's speed (hwprofile.Default)
)

func tpmLabel(kind string) string {
	if kind == kindHW {
		return "hw profile"
	}
	return kind
}

// errStopped is what a stopped gate answers.
var errStopped = errors.New("benchmark run over: TPM gate closed")

// gate wraps a run's TPM so the run can end at once: after stop, every
// command fails immediately, so whatever the multiplexer still has queued
// (a one-extend-per-record baseline may hold minutes of work) fails fast
// instead of being committed.
type gate struct {
	tpm.TPM
	stopped atomic.Bool
	quotes  atomic.Uint64 // quotes taken (counted here so the benchmark need not take the mux's commit lock)
	// quoteNanos is the time spent in Quote and ReadPCRs (a quote's PCR
	// read) calls that have returned, and quoted how many Quote calls have
	// returned: P3 takes the quote time Q of its ideal from them.
	quoteNanos atomic.Int64
	quoted     atomic.Uint64

	mu     sync.Mutex
	starts []time.Time // when each Quote call began (P3 measures whole quote cycles)
}

// quoteStarts returns when the Quote calls that began in [from, to) began.
func (g *gate) quoteStarts(from, to time.Time) []time.Time {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []time.Time
	for _, t := range g.starts {
		if !t.Before(from) && t.Before(to) {
			out = append(out, t)
		}
	}
	return out
}

func (g *gate) stop() { g.stopped.Store(true) }

func (g *gate) Extend(ctx context.Context, pcr int, d [32]byte) error {
	if g.stopped.Load() {
		return errStopped
	}
	return g.TPM.Extend(ctx, pcr, d)
}

func (g *gate) ReadPCRs(ctx context.Context, pcrs []int) ([][32]byte, error) {
	if g.stopped.Load() {
		return nil, errStopped
	}
	defer g.timeQuote(time.Now())
	return g.TPM.ReadPCRs(ctx, pcrs)
}

func (g *gate) Quote(ctx context.Context, pcrs []int, extra []byte) (tpm.Quote, error) {
	if g.stopped.Load() {
		return tpm.Quote{}, errStopped
	}
	g.quotes.Add(1)
	g.mu.Lock()
	g.starts = append(g.starts, time.Now())
	g.mu.Unlock()
	defer g.quoted.Add(1)
	defer g.timeQuote(time.Now())
	return g.TPM.Quote(ctx, pcrs, extra)
}

func (g *gate) timeQuote(start time.Time) { g.quoteNanos.Add(int64(time.Since(start))) }

func (g *gate) AK() *ecdsa.PublicKey { return g.TPM.AK() }

// sealer is tpm.Sealer's method set; a gate forwards it when its TPM has it.
type sealer interface {
	Seal(ctx context.Context, data []byte) ([]byte, error)
	Unseal(ctx context.Context, blob []byte) ([]byte, error)
}

type sealingGate struct {
	*gate
	s sealer
}

func (g *sealingGate) Seal(ctx context.Context, data []byte) ([]byte, error) {
	return g.s.Seal(ctx, data)
}

func (g *sealingGate) Unseal(ctx context.Context, blob []byte) ([]byte, error) {
	return g.s.Unseal(ctx, blob)
}

// runTPM is one run's TPM: fresh, with the multiplexer PCR at its reset
// value.
type runTPM struct {
	tpm.TPM // what the multiplexer gets (the gate)
	g       *gate
	close   func() error
}

// openTPM opens a fresh TPM of kind: the simulator is remanufactured on
// every open, and swtpm is a new process (a rebooted TPM).
func (e *env) openTPM(ctx context.Context, kind string) (*runTPM, error) {
	var inner tpm.TPM
	var stopProc func() error
	switch kind {
	case kindSim, kindHW:
		t, err := tpm.Open(ctx, "sim")
		if err != nil {
			return nil, err
		}
		inner = t
		if kind == kindHW {
			inner = hwprofile.Wrap(t, hwprofile.Default)
		}
	case kindSwtpm:
		dir, err := tempDir(e.work, "swtpm-")
		if err != nil {
			return nil, err
		}
		p, err := swtpmproc.StartWith(ctx, swtpmproc.Options{StateDir: dir, DieWithParent: true})
		if err != nil {
			removeAll(dir)
			return nil, err
		}
		t, err := tpm.Open(ctx, p.Spec())
		if err != nil {
			p.Stop()
			removeAll(dir)
			return nil, err
		}
		inner = t
		stopProc = func() error {
			err := p.Stop()
			removeAll(dir)
			return err
		}
	default:
		return nil, fmt.Errorf("unknown TPM kind %q (want sim, swtpm or hw)", kind)
	}
	g := &gate{TPM: inner}
	rt := &runTPM{TPM: g, g: g}
	if s, ok := inner.(sealer); ok {
		rt.TPM = &sealingGate{gate: g, s: s}
	}
	rt.close = func() error {
		err := inner.Close()
		if stopProc != nil {
			err = errors.Join(err, stopProc())
		}
		return err
	}
	return rt, nil
}

// Close stops the gate and closes the TPM (and its swtpm process).
func (r *runTPM) Close() error {
	r.g.stop()
	return r.close()
}
