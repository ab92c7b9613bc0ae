// Package hwprofile is a benchmark-only tpm.TPM wrapper that makes a fast
// TPM (the in-process simulator, or swtpm) as slow as a discrete hardware
// TPM, so the multiplexer's batching can be measured against the cost it is
// built to amortize without a hardware TPM on the benchmark machine.
//
// Every command is given a fixed service time, and commands are served one
// at a time, as a TPM executes one command at a time: a command issued while
// another runs waits for it. A command's service time counts the wrapped
// TPM's own time (which on the simulator is microseconds, far below the
// profile's figures): the wrapper sleeps until service time has passed since
// the command started, so the total is max(service time, inner time).
//
// # The default profile and where its numbers come from
//
//   - Extend, 3 ms per TPM2_PCR_Extend. The figure the project's performance
//     issue measured for a discrete TPM ("on hardware a PCR_Extend costs
//     ~3 ms"), which is why one extend per measurement tops out near 300
//     measurements/s. Assumption: one sha256 digest per extend, as the
//     multiplexer sends.
//   - Quote, 200 ms per TPM2_Quote. ECDSA P-256 signing on TPMs measured by
//     Chrome's study of TPM signature latency: 200 ms at the median and
//     600 ms at the 95th percentile (reported in S. Kristoffersen, "TPM
//     performance", stiankri.substack.com/p/tpm-performance, which also
//     finds single-digit signatures per second on most systems). The
//     profile takes the optimistic end, so the one-quote-per-request
//     baseline is not handicapped: 1/0.2 s = 5 quotes/s.
//   - PCRRead, 1 ms per TPM2_PCR_Read command. Assumption: a read-only
//     command with a small response, dominated by the bus round trip to the
//     chip (SPI/LPC at tens of MHz) and command dispatch, well below an
//     extend. A TPM returns at most eight digests per TPM2_PCR_Read, so a
//     ReadPCRs of n PCRs is charged ceil(n/8) commands, as the tpm package
//     issues them (the multiplexer's quote selection, PCRs 0-7, 10 and 23,
//     takes two).
//   - Seal and Unseal (when the wrapped TPM can seal) are passed through
//     without a delay: the multiplexer uses them once, at Open.
//
// Real TPMs vary widely (firmware TPMs are faster, some discrete ones are
// slower, and a TPM may throttle); Profile lets a benchmark use other
// figures. The profile models latency only: it does not model the TPM's
// dictionary-attack lockout, its command queue depth, or bus contention
// from other TPM users on the host.
package hwprofile

import (
	"context"
	"crypto/ecdsa"
	"fmt"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Profile is the service time of each TPM command.
type Profile struct {
	Extend  time.Duration // one TPM2_PCR_Extend
	Quote   time.Duration // one TPM2_Quote
	PCRRead time.Duration // one TPM2_PCR_Read (at most 8 PCRs)
}

// Default is the discrete-TPM profile the package doc justifies.
var Default = Profile{Extend: 3 * time.Millisecond, Quote: 200 * time.Millisecond, PCRRead: time.Millisecond}

// pcrsPerRead is how many digests one TPM2_PCR_Read returns.
const pcrsPerRead = 8

// TPM is a tpm.TPM that serves commands at a Profile's speed.
type TPM struct {
	inner tpm.TPM
	p     Profile

	mu    sync.Mutex // one command at a time, as on the chip
	stats Stats
}

// Stats counts the commands served and the time spent waiting to emulate
// the profile.
type Stats struct {
	Extends, Quotes, PCRReads uint64
	Delay                     time.Duration
}

// sealer is the method set of tpm.Sealer, forwarded when the wrapped TPM
// has it (kept as a local interface so this package needs nothing else
// from tpm).
type sealer interface {
	Seal(ctx context.Context, data []byte) ([]byte, error)
	Unseal(ctx context.Context, blob []byte) ([]byte, error)
}

// sealingTPM is a TPM whose inner TPM can seal.
type sealingTPM struct {
	*TPM
	s sealer
}

func (s *sealingTPM) Seal(ctx context.Context, data []byte) ([]byte, error) {
	return s.s.Seal(ctx, data)
}

func (s *sealingTPM) Unseal(ctx context.Context, blob []byte) ([]byte, error) {
	return s.s.Unseal(ctx, blob)
}

// Wrap returns inner served at profile p's speed. The result implements the
// same optional sealing methods as inner.
func Wrap(inner tpm.TPM, p Profile) tpm.TPM {
	t := New(inner, p)
	if s, ok := inner.(sealer); ok {
		return &sealingTPM{TPM: t, s: s}
	}
	return t
}

// New returns the wrapper itself (for its Stats); Wrap is the usual entry.
func New(inner tpm.TPM, p Profile) *TPM { return &TPM{inner: inner, p: p} }

// Open opens the TPM named by spec (see tpm.Open) and wraps it with p.
func Open(ctx context.Context, spec string, p Profile) (tpm.TPM, error) {
	inner, err := tpm.Open(ctx, spec)
	if err != nil {
		return nil, err
	}
	return Wrap(inner, p), nil
}

// Unwrap returns the wrapped TPM.
func (t *TPM) Unwrap() tpm.TPM { return t.inner }

// Profile returns the profile in use.
func (t *TPM) Profile() Profile { return t.p }

// Stats returns the counters so far.
func (t *TPM) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stats
}

// serve runs fn as one or more commands with total service time d: it holds
// the command lock, runs fn, and sleeps out the rest of d. A context that has
// ended before the command starts fails it at once, as a TPM stack would not
// send it; once started, a command runs its full service time, as it would
// on the chip.
func (t *TPM) serve(ctx context.Context, d time.Duration, fn func() error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("hwprofile: %w", err)
	}
	start := time.Now()
	err := fn()
	if rest := d - time.Since(start); rest > 0 {
		t.stats.Delay += rest
		time.Sleep(rest)
	}
	return err
}

// Extend implements tpm.TPM.
func (t *TPM) Extend(ctx context.Context, pcr int, digest [32]byte) error {
	return t.serve(ctx, t.p.Extend, func() error {
		t.stats.Extends++
		return t.inner.Extend(ctx, pcr, digest)
	})
}

// ReadPCRs implements tpm.TPM, charged one PCRRead per eight PCRs.
func (t *TPM) ReadPCRs(ctx context.Context, pcrs []int) ([][32]byte, error) {
	n := max(1, (len(pcrs)+pcrsPerRead-1)/pcrsPerRead)
	var vals [][32]byte
	err := t.serve(ctx, time.Duration(n)*t.p.PCRRead, func() error {
		t.stats.PCRReads += uint64(n)
		var err error
		vals, err = t.inner.ReadPCRs(ctx, pcrs)
		return err
	})
	return vals, err
}

// Quote implements tpm.TPM.
func (t *TPM) Quote(ctx context.Context, pcrs []int, extraData []byte) (tpm.Quote, error) {
	var q tpm.Quote
	err := t.serve(ctx, t.p.Quote, func() error {
		t.stats.Quotes++
		var err error
		q, err = t.inner.Quote(ctx, pcrs, extraData)
		return err
	})
	return q, err
}

// ClockInfo implements tpm.TPM, charged as one PCR read (a small command).
func (t *TPM) ClockInfo(ctx context.Context) (tpm.ClockInfo, error) {
	var ci tpm.ClockInfo
	err := t.serve(ctx, t.p.PCRRead, func() error {
		var err error
		ci, err = t.inner.ClockInfo(ctx)
		return err
	})
	return ci, err
}

// ResettablePCRs implements tpm.TPM, charged as one PCR read.
func (t *TPM) ResettablePCRs(ctx context.Context) ([]int, error) {
	var out []int
	err := t.serve(ctx, t.p.PCRRead, func() error {
		var err error
		out, err = t.inner.ResettablePCRs(ctx)
		return err
	})
	return out, err
}

// AK implements tpm.TPM (no command: the AK's public key is cached).
func (t *TPM) AK() *ecdsa.PublicKey { return t.inner.AK() }

// Close implements tpm.TPM: it closes the wrapped TPM.
func (t *TPM) Close() error { return t.inner.Close() }
