// Package mux is the group-committed multiplexer at the heart of the bridge:
// it takes records from many VMs, conceals them, makes each batch durable in
// the log store, extends the batch digest into one TPM PCR, and only then
// acknowledges the records. Quotes are taken between batches under the
// commit lock, so evidence always replays exactly to the quoted PCR.
package mux

import (
	"cmp"
	"context"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Defaults of the multiplexer's configuration.
const (
	// DefaultPCR is the protocol's default anchor, PCR 13 (see conceal).
	DefaultPCR      = conceal.DefaultPCR
	DefaultMaxBatch = 8192
)

// ErrResettablePCR is returned by Open when the configured PCR can be reset
// at locality 0 without a reboot (PC-client PCRs 16 and 23): whoever reaches
// the TPM could then roll anchored history back.
var ErrResettablePCR = errors.New("PCR can be reset without a reboot")

// DefaultHostPCRs are the host PCRs every quote covers besides the mux PCR,
// so a verifier can appraise the host's boot and IMA state.
var DefaultHostPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 10}

// Errors callers can test for.
var (
	ErrUnknownVM = errors.New("unknown vm")
	ErrEnded     = errors.New("vm instance has ended")
	ErrClosed    = errors.New("multiplexer closed")
)

// Config configures a Mux.
type Config struct {
	PCR int // the PCR the mux owns (sha256 bank); default 13
	// InsecureResettablePCR lets the mux anchor in a PCR that can be
	// reset at locality 0 (16, 23). Only for tests of the attack it
	// allows: anyone who reaches the TPM can then truncate history.
	InsecureResettablePCR bool
	HostPCRs              []int        // host PCRs quoted alongside; default 0–7 and 10
	MaxBatch              int          // most records in one batch; default 8192
	Host                  string       // host name written into epoch records
	Version               string       // bridge version written into epoch records
	Logger                *slog.Logger // default slog.Default()
	Now                   func() time.Time
	// NoQuoteBatching takes one quote per evidence request (the baseline
	// of the benchmarks) instead of sharing quotes between concurrent ones.
	NoQuoteBatching bool
	// Observer, if set, receives per-operation measurements for
	// metrics (observe.go).
	Observer Observer
	// Sealer seals the store's data key; default: the TPM itself when it
	// can seal. Without one, VM keys are stored in clear.
	Sealer tpm.Sealer
	// TPMTimeout bounds one extend: a TPM that stops answering faults the
	// mux (no acks, no evidence) instead of stalling it. Default 30 s.
	TPMTimeout time.Duration
	// KeyRetention is how long after teardown a VM's key and records are
	// kept; afterwards ForgetExpired destroys them. 0 keeps them forever.
	KeyRetention time.Duration
	// Cover conceals the VMs' activity from each other with cover leaves
	// (commit.go); the zero value is off.
	Cover Cover
	// ApplyEvery is the least time between two bbolt transactions that no
	// reader waits for (the write-ahead log holds their records
	// meanwhile); default 100 ms (commit.go, defaultApplyEvery).
	ApplyEvery time.Duration
}

// Mux multiplexes VM records onto one TPM PCR.
type Mux struct {
	cfg   Config
	tpm   tpm.TPM
	store *logstore.Store
	log   *slog.Logger
	sel   []int // quote selection, ascending

	// mu guards the queue, the VM map and the per-VM ending flags.
	mu     sync.Mutex
	queue  []*item
	urgent int // queued vTPM events: a guest kernel waits on each
	// durableWaiters counts queued records whose guest waits only for
	// durability (a vTPM journal in mode durable): the committer never
	// holds those back to gather.
	durableWaiters int
	// gather holds the next batch for the anchored guests the last extend
	// answered (commit.go, gatherWait).
	regather gatherState
	// lastExtend is the last extend's duration (ns), for the gather.
	lastExtend atomic.Int64
	vms        map[conceal.Digest]*vmState
	wake       chan struct{}
	closed     bool
	fault      error // set when the log and the PCR may be out of step

	// commitMu is held for a whole batch commit and for every quote; the
	// fields below it change only under it.
	commitMu  sync.Mutex
	epoch     uint64
	epochRec  []byte
	epochInfo *record.Epoch // epochRec decoded
	nextG     uint64
	nextBatch uint64
	pcrValue  conceal.Digest // PCR value the store replays to

	// qmu guards the quote batcher.
	qmu      sync.Mutex
	qpending []*quoteReq
	quoting  bool
	qwake    chan struct{} // the queued requests wait for it to close (evidence.go)
	qfixed   chan struct{} // closed when the quote the queued requests wait for has its batch fixed
	qtarget  int           // the gather waits for this many queued requests
	qgather  chan struct{} // tells the gather that qtarget is reached

	akOnce sync.Once // akEncoded
	akDER  []byte
	akPEM  []byte

	aead cipher.AEAD // wraps VM keys; nil when keys are stored in clear

	cover coverState // slot schedule of activity concealment (commit.go)

	evOnce  sync.Once           // evidence build budget (evidence.go)
	evSem   *semaphore.Weighted // bytes of evidence being built at once
	evLimit int64               // its size; 0: DefaultEvidenceBudget
	evCache logCache            // recently encoded log segments, which requests share

	// smu guards stats, which the committer, the extends it leaves
	// running and the quotes all update.
	smu   sync.Mutex
	stats Stats
	// inflight is the newest batch while it is applied and extended (under
	// commitMu); quotes and heals wait for it.
	inflight    *inflightExtend
	extendSlots chan struct{} // a slot per batch being applied and extended (maxInflight)
	// pending are the staged (durable) items no batch holds yet, oldest
	// first (guarded by mu; the committer moves them into batches).
	pending []*item
	// pendingHeld is how many of pending, at its end, a stage-only group
	// staged (Cover on): a VM's genesis, durable at once so that the VM
	// starts without waiting for the slot, and the records queued with
	// it. They join any batch made, but never cause one (a slot does):
	// a batch off the schedule would show the VM's start to the others.
	pendingHeld int
	// pendingAcked is how many of pending someone waits for beyond
	// durability (an agent's acknowledgement, an anchored guest): while
	// it is 0 the committer paces their batch (durablePace).
	pendingAcked int
	// pendingSince is when the oldest of pending was left unbatched.
	pendingSince time.Time
	// freedAt is when an extend slot was last freed (UnixNano): pending
	// records could be batched from then on.
	freedAt atomic.Int64
	// The applier (applyLoop) writes durable batches into bbolt in order.
	amu        sync.Mutex
	applyQ     []*inflightExtend
	applyStop  bool
	applyWake  chan struct{}
	applyFlush chan struct{}
	applyDone  chan struct{}
	applyEvery time.Duration // least time between bbolt transactions
	// applyWaiters counts callers waiting for a batch to be in bbolt
	// (urgentApply): the applier does not wait for more batches then.
	applyWaiters atomic.Int32
	done         chan struct{}
	runCtx       context.Context // the committer's; extends run under it
	stopRun      context.CancelFunc
}

type vmState struct {
	vm     logstore.VM // persistent state; NextSeq, Ended change under commitMu
	id     conceal.Digest
	keys   *conceal.Keys // used only by the committer
	ending bool          // a teardown is queued (guarded by mu)
	// heldUntil is, while the VM's genesis is held for the slot
	// (pendingHeld), the NextSeq bbolt reaches once it is batched; 0
	// otherwise, or once a reader saw it batched.
	heldUntil atomic.Uint64
}

type item struct {
	vm     *vmState
	r      []byte
	h      conceal.Digest // H(r), computed by the submitter, off the committer's path
	kind   record.Kind
	reason string
	ticket *Ticket // set on the last item of a submission
	// wait is what the submitter waits for: the extend (an anchored
	// vTPM event), or durability only (a durable one).
	wait  waitFor
	seq   uint64 // the record's number in its VM, once staged
	frame uint64 // the write-ahead log frame that staged it
}

// Ack says where an acknowledged record sits.
type Ack struct {
	Seq   uint64 // the record's number s within its VM
	G     uint64 // its global index in the epoch's public log
	Batch uint64 // the batch that holds it
}

// Ticket completes when a submission's records are durable and extended.
type Ticket struct {
	done    chan struct{}
	durable chan struct{} // closed once the submission is staged (durable)
	// extended is closed once its batch is extended into the PCR (it may
	// not be in bbolt yet: done follows).
	extended chan struct{}
	once     sync.Once     // done is closed once: acknowledged or failed
	urgent   func() func() // keeps the applier from waiting for more batches (Wait)
	ack      Ack
	err      error
}

// finish completes the ticket, once; a later call changes nothing.
func (t *Ticket) finish(ack Ack, err error) {
	t.once.Do(func() {
		t.ack, t.err = ack, err
		close(t.done)
	})
}

// WaitDurable blocks until the submission's records are durable in the log
// store (true; the extend may still be under way or have failed, and the
// next start or heal extends them), or until the submission failed before
// it was written (false and the error: nothing of it was recorded), or ctx
// ends (false and ctx's error: not known).
func (t *Ticket) WaitDurable(ctx context.Context) (bool, error) {
	select {
	case <-t.durable:
		return true, nil
	case <-t.done:
		select {
		case <-t.durable:
			return true, nil
		default:
		}
		return false, t.err
	case <-ctx.Done():
		return false, fmt.Errorf("wait for durability: %w", ctx.Err())
	}
}

// WaitExtended blocks until the submission's batch is extended into the
// PCR (nil; bbolt may not hold it yet, Wait says when it does), or the
// submission failed, or ctx ends.
func (t *Ticket) WaitExtended(ctx context.Context) error {
	select {
	case <-t.extended:
		return nil
	case <-t.done:
		select {
		case <-t.extended:
			return nil
		default:
		}
		return t.err
	case <-ctx.Done():
		return fmt.Errorf("wait for the extend: %w", ctx.Err())
	}
}

// Wait blocks until the submission is acknowledged or fails, or ctx ends.
// A failed submission was not acknowledged; some of its records may be
// durable (the agent's resume exchange finds out which). Its records go
// into bbolt without the applier's wait for more batches.
func (t *Ticket) Wait(ctx context.Context) (Ack, error) {
	if t.urgent != nil {
		defer t.urgent()()
	}
	select {
	case <-t.done:
		return t.ack, t.err
	case <-ctx.Done():
		return Ack{}, fmt.Errorf("wait for acknowledgement: %w", ctx.Err())
	}
}

// Stats are cumulative counters for metrics.
type Stats struct {
	Batches     uint64
	Records     uint64
	Extends     uint64
	Quotes      uint64
	ExtendNanos uint64
	QuoteNanos  uint64
	MaxBatch    int
	// Writes counts the write-ahead log writes, one fdatasync each: a
	// record's cost on the disk is Writes/Records of them.
	Writes uint64
	// Applied counts the batches written into bbolt, which follows
	// Batches (durable and extended) by up to Config.ApplyEvery unless a
	// reader waits for it.
	Applied uint64
}

// Open recovers the mux state from the store and the TPM (docs/protocol.md, PCR and epochs) and
// starts the committer. When PCR p is at its reset value a new epoch begins;
// when the store's last batch is durable but not extended, it is extended
// now; when the PCR matches no replay of the store, Open still succeeds but
// the mux is faulted: it acknowledges nothing and serves no evidence, and
// Status says why.
func Open(ctx context.Context, t tpm.TPM, st *logstore.Store, cfg Config) (*Mux, error) {
	if cfg.PCR == 0 {
		cfg.PCR = DefaultPCR
	}
	if cfg.PCR < 0 || cfg.PCR > 23 {
		return nil, fmt.Errorf("mux pcr %d out of range 0-23", cfg.PCR)
	}
	if cfg.HostPCRs == nil {
		cfg.HostPCRs = DefaultHostPCRs
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = DefaultMaxBatch
	}
	if cfg.TPMTimeout <= 0 {
		cfg.TPMTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	sel := slices.Clone(cfg.HostPCRs)
	if !slices.Contains(sel, cfg.PCR) {
		sel = append(sel, cfg.PCR)
	}
	slices.Sort(sel)
	sel = slices.Compact(sel)
	m := &Mux{
		cfg:   cfg,
		tpm:   t,
		store: st,
		log:   cfg.Logger,
		sel:   sel,
		vms:   make(map[conceal.Digest]*vmState),
		wake:  make(chan struct{}, 1),
		done:  make(chan struct{}),

		extendSlots: make(chan struct{}, maxInflight),
		applyDone:   make(chan struct{}),
		applyWake:   make(chan struct{}, 1),
		applyFlush:  make(chan struct{}, 1),
		applyEvery:  cmp.Or(cfg.ApplyEvery, defaultApplyEvery),
	}
	if err := m.openDataKey(ctx); err != nil {
		return nil, err
	}
	if err := m.batchUnbatched(); err != nil {
		return nil, err
	}
	if err := m.recover(ctx); err != nil {
		var rf *ReplayError
		if !errors.As(err, &rf) {
			return nil, err
		}
		m.fault = err
		m.log.Error("log does not replay to the PCR; refusing to acknowledge or serve evidence", "err", err)
	}
	if err := m.loadVMs(); err != nil {
		return nil, err
	}
	if m.fault == nil {
		if err := m.finishTeardowns(ctx); err != nil {
			return nil, err
		}
	}
	runCtx, cancel := context.WithCancel(context.Background())
	m.runCtx, m.stopRun = runCtx, cancel
	go m.applyLoop()
	go m.run(runCtx)
	return m, nil
}

// Close stops accepting records, commits what is queued, and stops the
// committer. It does not close the TPM or the store.
func (m *Mux) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		<-m.done
		return nil
	}
	m.closed = true
	m.mu.Unlock()
	m.kick()
	<-m.done
	m.amu.Lock()
	m.applyStop = true
	m.amu.Unlock()
	select {
	case m.applyWake <- struct{}{}:
	default:
	}
	<-m.applyDone
	m.stopRun()
	return nil
}

// ReplayError reports that PCR p holds a value no replay of the store gives.
type ReplayError struct {
	PCR     int
	Got     conceal.Digest
	Want    conceal.Digest
	Epoch   uint64
	Batches uint64
	Detail  string
}

func (e *ReplayError) Error() string {
	if e.Detail != "" {
		return fmt.Sprintf("PCR %d does not replay from the log store (epoch %d, %d batches): %s", e.PCR, e.Epoch, e.Batches, e.Detail)
	}
	return fmt.Sprintf("PCR %d is %x but the log store (epoch %d, %d batches) replays to %x", e.PCR, e.Got[:8], e.Epoch, e.Batches, e.Want[:8])
}

// checkAnchor refuses a PCR that anyone can reset at locality 0 without a
// reboot, unless the configuration says the risk is taken on purpose.
func (m *Mux) checkAnchor(ctx context.Context) error {
	resettable, err := m.tpm.ResettablePCRs(ctx)
	if err != nil {
		return fmt.Errorf("check pcr %d: %w", m.cfg.PCR, err)
	}
	if !slices.Contains(resettable, m.cfg.PCR) && m.cfg.PCR != 16 && m.cfg.PCR != 23 {
		return nil
	}
	if m.cfg.InsecureResettablePCR {
		m.log.Warn("anchoring in a PCR that can be reset without a reboot: anyone who reaches the TPM can truncate history (insecure, for tests only)", "pcr", m.cfg.PCR)
		return nil
	}
	return fmt.Errorf("pcr %d: %w (this TPM resets PCRs %v at locality 0): anyone who reaches the TPM could truncate anchored history; use a PCR of 0-15, e.g. the default %d (docs/protocol.md)", m.cfg.PCR, ErrResettablePCR, resettable, DefaultPCR)
}

// recover replays the store's current epoch against the PCR and the TPM's
// counters (docs/protocol.md "PCR and epochs"). A new epoch opens only when
// the TPM's power cycle changed: another resetCount or restartCount, a
// cleared TPM (its clock went back) or another TPM (another AK). Within the
// same power cycle the PCR must replay from the store; a PCR found back at
// the epoch's start value is a reset without a reboot and faults the mux.
func (m *Mux) recover(ctx context.Context) error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	if err := m.checkAnchor(ctx); err != nil {
		return err
	}
	ci, err := m.tpm.ClockInfo(ctx)
	if err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	vals, err := m.tpm.ReadPCRs(ctx, []int{m.cfg.PCR})
	if err != nil {
		return fmt.Errorf("read pcr %d: %w", m.cfg.PCR, err)
	}
	got := vals[0]
	info, ok, err := m.store.CurrentEpoch()
	if err != nil {
		return err
	}
	if !ok {
		return m.beginEpoch(ctx, 1, got, ci)
	}
	er, err := record.UnmarshalEpoch(info.Record)
	if err != nil {
		return fmt.Errorf("epoch %d in the log store: %w (a store written by an older tpmmux; move it aside to start afresh)", info.Number, err)
	}
	if why := newPowerCycle(er, ci, quote.AKFingerprint(m.tpm.AK())); why != "" {
		m.log.Info("the TPM's power cycle changed: beginning a new epoch", "why", why, "pcr", m.cfg.PCR, "previous_epoch", info.Number)
		return m.beginEpoch(ctx, info.Number+1, got, ci)
	}
	if int(er.PCR) != m.cfg.PCR {
		return fmt.Errorf("epoch %d anchors in PCR %d but the bridge is configured for PCR %d in the same TPM power cycle: configure pcr %d until the host reboots", info.Number, er.PCR, m.cfg.PCR, er.PCR)
	}
	m.epoch, m.epochRec, m.epochInfo = info.Number, info.Record, er
	rp, err := m.replay(info, er.StartValue)
	if err != nil {
		return &ReplayError{PCR: m.cfg.PCR, Got: got, Epoch: info.Number, Detail: err.Error()}
	}
	m.nextG, m.nextBatch = rp.nextG, rp.batches
	m.pcrValue = rp.value
	if got == rp.value {
		m.log.Info("log store replays to the PCR", "epoch", m.epoch, "batches", m.nextBatch, "entries", m.nextG)
		return nil
	}
	if ok, err := m.catchUp(ctx, rp, got); ok {
		return err
	}
	switch got {
	case er.StartValue, conceal.Digest{}:
		return &ReplayError{PCR: m.cfg.PCR, Got: got, Want: rp.value, Epoch: info.Number, Batches: rp.batches,
			Detail: fmt.Sprintf("PCR %d is back at its reset value but the TPM's resetCount (%d) has not changed: it was reset without a reboot, which would truncate anchored history; refusing to open a new epoch", m.cfg.PCR, ci.ResetCount)}
	default:
		return &ReplayError{PCR: m.cfg.PCR, Got: got, Want: rp.value, Epoch: info.Number, Batches: rp.batches}
	}
}

// newPowerCycle says why the TPM is no longer in the power cycle the epoch
// was opened in, or "" if it still is.
func newPowerCycle(er *record.Epoch, ci tpm.ClockInfo, ak conceal.Digest) string {
	switch {
	case er.AK != ak:
		return "another TPM (the AK differs from the epoch's)"
	case ci.ResetCount != er.ResetCount:
		return fmt.Sprintf("TPM reset (host reboot): resetCount %d -> %d", er.ResetCount, ci.ResetCount)
	case ci.Clock < er.Clock:
		return fmt.Sprintf("TPM cleared: its clock went back from %d to %d ms", er.Clock, ci.Clock)
	case ci.RestartCount != er.RestartCount:
		return fmt.Sprintf("TPM restart or resume (suspend): restartCount %d -> %d", er.RestartCount, ci.RestartCount)
	}
	return ""
}

type replayResult struct {
	batches uint64
	nextG   uint64
	value   conceal.Digest
	// tail are the last batches (at most maxUnextended of them): the PCR
	// value before each and its digest, oldest first.
	tail []tailBatch
}

// tailBatch is one of the last batches of a replay.
type tailBatch struct {
	before conceal.Digest
	v      conceal.Digest
}

// maxInflight bounds the batches written to the write-ahead log but not
// yet extended (each extend waits for the one before it, so they stay in
// order), and maxUnextended is then how many of the newest batches a crash
// can leave durable but not extended: those, and the one the next start
// makes of the records staged but not batched (batchUnbatched). Records do
// not wait for a slot to be durable, only to be batched: one batch at a
// time keeps an anchored record's wait to the extend running when it
// arrives and its own.
const (
	maxInflight   = 1
	maxUnextended = maxInflight + 1
)

// catchUp extends the batches of rp's tail that PCR value got has not
// seen. It reports false when got is none of the tail's values (nor the
// replay's), so the log and the PCR are not in step.
func (m *Mux) catchUp(ctx context.Context, rp replayResult, got conceal.Digest) (bool, error) {
	if got == rp.value {
		return true, nil
	}
	for i := len(rp.tail) - 1; i >= 0; i-- {
		if rp.tail[i].before != got {
			continue
		}
		for j := i; j < len(rp.tail); j++ {
			batch := rp.batches - uint64(len(rp.tail)-j)
			m.log.Info("batch was durable but not extended: extending it now", "epoch", m.epoch, "batch", batch)
			if err := m.extend(ctx, rp.tail[j].v); err != nil {
				return true, fmt.Errorf("extend recovered batch %d: %w", batch, err)
			}
		}
		return true, nil
	}
	return false, nil
}

// replay recomputes every batch digest of an epoch from its entries and
// folds them into the PCR value they extend to.
func (m *Mux) replay(info logstore.EpochInfo, start conceal.Digest) (replayResult, error) {
	rp := replayResult{value: start}
	err := m.store.View(func(sn *logstore.Snapshot) error {
		return sn.Batches(info.Number, 0, func(index uint64, b *logstore.Batch) error {
			if index != rp.batches {
				return fmt.Errorf("batch %d missing (found %d)", rp.batches, index)
			}
			if b.G0 != rp.nextG {
				return fmt.Errorf("batch %d starts at global index %d, want %d", index, b.G0, rp.nextG)
			}
			if index == 0 && len(b.Epoch) == 0 {
				return fmt.Errorf("batch 0 lacks the epoch record")
			}
			v, n, err := conceal.BatchValue(b.G0, b.Epoch, b.Entries)
			if err != nil {
				return fmt.Errorf("batch %d: %w", index, err)
			}
			if n != b.N {
				return fmt.Errorf("batch %d says %d leaves, holds %d", index, b.N, n)
			}
			if v != b.V {
				return fmt.Errorf("batch %d digest does not match its entries (store corrupted)", index)
			}
			rp.tail = append(rp.tail, tailBatch{before: rp.value, v: v})
			if len(rp.tail) > maxUnextended {
				rp.tail = rp.tail[1:]
			}
			rp.value = conceal.ExtendPCR(rp.value, v)
			rp.nextG += uint64(n)
			rp.batches++
			return nil
		})
	})
	if err != nil {
		return rp, fmt.Errorf("replay epoch %d: %w", info.Number, err)
	}
	if rp.batches == 0 {
		return rp, fmt.Errorf("replay epoch %d: no batches", info.Number)
	}
	return rp, nil
}

// beginEpoch writes the epoch record as batch 0 of a new epoch and extends
// it. The record binds the epoch to the TPM's power cycle (resetCount,
// restartCount, clock, AK) and to the value PCR p holds now, which host
// boot components may have extended.
func (m *Mux) beginEpoch(ctx context.Context, number uint64, start conceal.Digest, ci tpm.ClockInfo) error {
	er := &record.Epoch{Host: m.cfg.Host, BridgeVersion: m.cfg.Version, PCR: uint32(m.cfg.PCR), Time: m.cfg.Now().UnixNano(),
		StartValue: start, ResetCount: ci.ResetCount, RestartCount: ci.RestartCount, Clock: ci.Clock, AK: quote.AKFingerprint(m.tpm.AK()),
		ClearDisabled: ci.ClearDisabled}
	if _, err := rand.Read(er.Nonce[:]); err != nil {
		return fmt.Errorf("draw epoch nonce: %w", err)
	}
	raw, err := er.Marshal()
	if err != nil {
		return err
	}
	v := conceal.BatchDigest(0, []conceal.Digest{conceal.EpochLeaf(raw)})
	b := logstore.Batch{G0: 0, N: 1, Epoch: raw, Entries: []byte{}, V: v}
	if err := m.store.BeginEpoch(number, raw, b, m.cfg.Now()); err != nil {
		return err
	}
	m.epoch, m.epochRec, m.epochInfo = number, raw, er
	m.nextG, m.nextBatch = 1, 1
	m.pcrValue = conceal.ExtendPCR(start, v)
	if err := m.extend(ctx, v); err != nil {
		return fmt.Errorf("extend epoch record: %w", err)
	}
	if !ci.ClearDisabled {
		m.log.Warn("TPM2_Clear is enabled on this TPM: a host root could clear it (resetting resetCount and the clock) and replay this epoch's power cycle to a first-time verifier; disable it with `tpm2_clearcontrol -C l s` (docs/security.md)")
	}
	m.log.Info("began epoch", "epoch", number, "pcr", m.cfg.PCR, "reset_count", ci.ResetCount, "restart_count", ci.RestartCount, "start_value", fmt.Sprintf("%x", start[:8]))
	return nil
}

func (m *Mux) extend(ctx context.Context, v conceal.Digest) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, m.cfg.TPMTimeout)
	defer cancel()
	err := m.tpm.Extend(ctx, m.cfg.PCR, v)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("TPM did not answer within %v: %w", m.cfg.TPMTimeout, err)
	}
	d := time.Since(start)
	m.lastExtend.Store(int64(d))
	m.smu.Lock()
	m.stats.Extends++
	m.stats.ExtendNanos += uint64(d)
	m.smu.Unlock()
	m.observeExtend(d)
	return err
}

// loadVMs brings the live VMs of the current epoch into memory.
func (m *Mux) loadVMs() error {
	return m.store.View(func(sn *logstore.Snapshot) error {
		return sn.VMs(func(vm *logstore.VM) error {
			if vm.Epoch != m.epoch || vm.Ended {
				return nil
			}
			k, err := m.unwrapKey(vm)
			if err != nil {
				return err
			}
			m.vms[vm.ID] = &vmState{vm: *vm, id: vm.ID, keys: conceal.Derive(k)}
			return nil
		})
	})
}

// finishTeardowns takes the post-mortem quote of any VM whose teardown is
// durable but whose quote was not kept (a crash in between).
func (m *Mux) finishTeardowns(ctx context.Context) error {
	var missing []conceal.Digest
	err := m.store.View(func(sn *logstore.Snapshot) error {
		return sn.VMs(func(vm *logstore.VM) error {
			if vm.Epoch == m.epoch && vm.Ended && !vm.Forgotten && vm.EndedBy != "epoch-ended" {
				if _, err := sn.Final(vm.ID); errors.Is(err, logstore.ErrNotFound) {
					missing = append(missing, vm.ID)
				}
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	for _, id := range missing {
		if err := m.takeFinal(ctx, id); err != nil {
			return err
		}
	}
	return nil
}

func (m *Mux) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// batchUnbatched commits, as one batch of the store's current epoch, the
// records the write-ahead log staged that no batch holds: a crash came
// after they were durable (and acknowledged as such) and before their
// batch was written. It runs before recover, which then extends this batch
// with any others the crash left unextended.
func (m *Mux) batchUnbatched() error {
	staged, _ := m.store.Unbatched()
	if len(staged) == 0 {
		return nil
	}
	info, ok, err := m.store.CurrentEpoch()
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("the write-ahead log holds %d staged records but the log store has no epoch (restore the state directory whole)", len(staged))
	}
	er, err := record.UnmarshalEpoch(info.Record)
	if err != nil {
		return fmt.Errorf("epoch %d in the log store: %w", info.Number, err)
	}
	rp, err := m.replay(info, er.StartValue)
	if err != nil {
		return fmt.Errorf("batch staged records: %w", err)
	}
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.epoch, m.epochRec, m.epochInfo = info.Number, info.Record, er
	m.nextG, m.nextBatch, m.pcrValue = rp.nextG, rp.batches, rp.value
	states := make(map[conceal.Digest]*vmState)
	err = m.store.View(func(sn *logstore.Snapshot) error {
		for _, st := range staged {
			if vs := states[st.ID]; vs != nil && st.VM == nil {
				continue
			}
			vm := st.VM
			if vm == nil {
				var err error
				if vm, err = sn.VM(st.ID); err != nil {
					return fmt.Errorf("staged record %d: %w", st.Seq, err)
				}
			}
			states[st.ID] = &vmState{vm: *vm, id: st.ID}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("batch staged records: %w", err)
	}
	for _, vs := range states {
		k, err := m.unwrapKey(&vs.vm)
		if err != nil {
			return fmt.Errorf("batch staged records: %w", err)
		}
		vs.keys = conceal.Derive(k)
	}
	items := make([]*item, len(staged))
	for i, st := range staged {
		rec, err := record.Unmarshal(st.R)
		if err != nil {
			return fmt.Errorf("staged record %d of vm %x: %w", st.Seq, st.ID[:8], err)
		}
		vs := states[st.ID]
		if st.VM != nil && vs.vm.FirstSeq != st.VM.FirstSeq {
			vs = &vmState{vm: *st.VM, id: st.ID, keys: vs.keys}
			states[st.ID] = vs
		}
		it := &item{vm: vs, r: st.R, h: record.Hash(st.R), kind: rec.Kind, seq: st.Seq}
		switch {
		case rec.Teardown != nil:
			it.reason = rec.Teardown.Reason
		case rec.Kind == record.KindMigratedOut:
			it.reason = EndedByMigration
		}
		vs.vm.NextSeq = st.Seq + 1
		if rec.Kind.Terminal() {
			vs.vm.Ended, vs.vm.EndedBy, vs.vm.EndedAt = true, it.reason, rec.Time
		}
		items[i] = it
	}
	b, err := m.buildBatch(items)
	if err != nil {
		return fmt.Errorf("batch staged records: %w", err)
	}
	if _, _, err := m.store.Stage(nil, b.cm); err != nil {
		return fmt.Errorf("batch staged records: %w", err)
	}
	if err := m.store.Apply([]*logstore.Commit{b.cm}); err != nil {
		return fmt.Errorf("batch staged records: %w", err)
	}
	if err := m.store.Release(m.store.NextFrame()); err != nil {
		m.log.Warn("write-ahead log segments not deleted", "err", err)
	}
	m.log.Info("records were durable but not batched: batched them now", "epoch", m.epoch, "batch", b.cm.Index, "records", len(items))
	return nil
}
