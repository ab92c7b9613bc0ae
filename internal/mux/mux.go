// Package mux is the group-committed multiplexer at the heart of the bridge:
// it takes records from many VMs, conceals them, makes each batch durable in
// the log store, extends the batch digest into one TPM PCR, and only then
// acknowledges the records. Quotes are taken between batches under the
// commit lock, so evidence always replays exactly to the quoted PCR.
package mux

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Defaults of the multiplexer's configuration.
const (
	DefaultPCR      = 23
	DefaultMaxBatch = 8192
)

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
	PCR      int          // the PCR the mux owns (sha256 bank); default 23
	HostPCRs []int        // host PCRs quoted alongside; default 0–7 and 10
	MaxBatch int          // most records in one batch; default 8192
	Host     string       // host name written into epoch records
	Version  string       // bridge version written into epoch records
	Logger   *slog.Logger // default slog.Default()
	Now      func() time.Time
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
	vms    map[conceal.Digest]*vmState
	wake   chan struct{}
	closed bool
	fault  error // set when the log and the PCR may be out of step

	// commitMu is held for a whole batch commit and for every quote; the
	// fields below it change only under it.
	commitMu  sync.Mutex
	epoch     uint64
	epochRec  []byte
	nextG     uint64
	nextBatch uint64
	pcrPrev   conceal.Digest // PCR value before the last batch
	pcrValue  conceal.Digest // PCR value the store replays to

	// qmu guards the quote batcher.
	qmu      sync.Mutex
	qpending []*quoteReq
	quoting  bool

	aead cipher.AEAD // wraps VM keys; nil when keys are stored in clear

	cover coverState // slot schedule of activity concealment (commit.go)

	evOnce  sync.Once           // evidence build budget (evidence.go)
	evSem   *semaphore.Weighted // bytes of evidence being built at once
	evLimit int64               // its size; 0: DefaultEvidenceBudget
	evCache logCache            // the log segment the last quote's requests share

	stats   Stats
	done    chan struct{}
	stopRun context.CancelFunc
}

type vmState struct {
	vm     logstore.VM // persistent state; NextSeq, Ended change under commitMu
	id     conceal.Digest
	keys   *conceal.Keys // used only by the committer
	ending bool          // a teardown is queued (guarded by mu)
}

type item struct {
	vm     *vmState
	r      []byte
	h      conceal.Digest // H(r), computed by the submitter, off the committer's path
	kind   record.Kind
	reason string
	ticket *Ticket // set on the last item of a submission
}

// Ack says where an acknowledged record sits.
type Ack struct {
	Seq   uint64 // the record's number s within its VM
	G     uint64 // its global index in the epoch's public log
	Batch uint64 // the batch that holds it
}

// Ticket completes when a submission's records are durable and extended.
type Ticket struct {
	done chan struct{}
	ack  Ack
	err  error
}

// Wait blocks until the submission is acknowledged or fails, or ctx ends.
// A failed submission was not acknowledged; some of its records may be
// durable (the agent's resume exchange finds out which).
func (t *Ticket) Wait(ctx context.Context) (Ack, error) {
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
}

// Open recovers the mux state from the store and the TPM (DESIGN.md §7) and
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
	}
	if err := m.openDataKey(ctx); err != nil {
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
	m.stopRun = cancel
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

// recover replays the store's current epoch against the PCR.
func (m *Mux) recover(ctx context.Context) error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	vals, err := m.tpm.ReadPCRs(ctx, []int{m.cfg.PCR})
	if err != nil {
		return fmt.Errorf("read pcr %d: %w", m.cfg.PCR, err)
	}
	got := vals[0]
	info, ok, err := m.store.CurrentEpoch()
	if err != nil {
		return err
	}
	if ok {
		rp, err := m.replay(info)
		if err != nil {
			if got == (conceal.Digest{}) {
				m.log.Warn("current epoch does not replay, but the PCR was reset: starting a new epoch", "err", err)
				return m.beginEpoch(ctx, info.Number+1)
			}
			return &ReplayError{PCR: m.cfg.PCR, Got: got, Epoch: info.Number, Detail: err.Error()}
		}
		m.epoch, m.epochRec = info.Number, info.Record
		m.nextG, m.nextBatch = rp.nextG, rp.batches
		m.pcrPrev, m.pcrValue = rp.prev, rp.value
		switch {
		case got == rp.value:
			m.log.Info("log store replays to the PCR", "epoch", m.epoch, "batches", m.nextBatch, "entries", m.nextG)
			return nil
		case got == rp.prev:
			m.log.Info("last batch was durable but not extended: extending it now", "epoch", m.epoch, "batch", m.nextBatch-1)
			if err := m.extend(ctx, rp.lastV); err != nil {
				return fmt.Errorf("extend recovered batch %d: %w", m.nextBatch-1, err)
			}
			return nil
		case got == conceal.Digest{}:
			m.log.Info("PCR is at its reset value: the host rebooted; beginning a new epoch", "pcr", m.cfg.PCR, "previous_epoch", info.Number)
			return m.beginEpoch(ctx, info.Number+1)
		default:
			return &ReplayError{PCR: m.cfg.PCR, Got: got, Want: rp.value, Epoch: info.Number, Batches: rp.batches}
		}
	}
	if got != (conceal.Digest{}) {
		return &ReplayError{PCR: m.cfg.PCR, Got: got, Detail: fmt.Sprintf("the store is empty but PCR %d is not at its reset value (%x); another program may be extending it", m.cfg.PCR, got[:8])}
	}
	return m.beginEpoch(ctx, 1)
}

type replayResult struct {
	batches uint64
	nextG   uint64
	prev    conceal.Digest
	value   conceal.Digest
	lastV   conceal.Digest
}

// replay recomputes every batch digest of an epoch from its entries and
// folds them into the PCR value they extend to.
func (m *Mux) replay(info logstore.EpochInfo) (replayResult, error) {
	var rp replayResult
	err := m.store.View(func(sn *logstore.Snapshot) error {
		return sn.Batches(info.Number, 0, func(index uint64, b *logstore.Batch) error {
			if index != rp.batches {
				return fmt.Errorf("batch %d missing (found %d)", rp.batches, index)
			}
			if b.G0 != rp.nextG {
				return fmt.Errorf("batch %d starts at global index %d, want %d", index, b.G0, rp.nextG)
			}
			if len(b.Entries)%logstore.EntrySize != 0 {
				return fmt.Errorf("batch %d entries are %d bytes", index, len(b.Entries))
			}
			n := b.EntryCount()
			epochLeaf := index == 0
			if epochLeaf {
				n++
				if len(b.Epoch) == 0 {
					return fmt.Errorf("batch 0 lacks the epoch record")
				}
			}
			if uint32(n) != b.N {
				return fmt.Errorf("batch %d says %d leaves, holds %d", index, b.N, n)
			}
			bh := conceal.NewBatchHasher(b.G0, b.N)
			if epochLeaf {
				bh.Add(conceal.EpochLeaf(b.Epoch))
			}
			for i := 0; i < b.EntryCount(); i++ {
				var t, c conceal.Digest
				copy(t[:], b.Entries[i*64:])
				copy(c[:], b.Entries[i*64+32:])
				bh.Add(conceal.Leaf(t, c))
			}
			v, _ := bh.Sum()
			if v != b.V {
				return fmt.Errorf("batch %d digest does not match its entries (store corrupted)", index)
			}
			rp.prev = rp.value
			rp.value = conceal.ExtendPCR(rp.value, v)
			rp.lastV = v
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

// beginEpoch writes the epoch record as batch 0 of a new epoch and extends it.
func (m *Mux) beginEpoch(ctx context.Context, number uint64) error {
	er := record.Epoch{Host: m.cfg.Host, BridgeVersion: m.cfg.Version, PCR: uint32(m.cfg.PCR), Time: m.cfg.Now().UnixNano()}
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
	m.epoch, m.epochRec = number, raw
	m.nextG, m.nextBatch = 1, 1
	m.pcrPrev, m.pcrValue = conceal.Digest{}, conceal.ExtendPCR(conceal.Digest{}, v)
	if err := m.extend(ctx, v); err != nil {
		return fmt.Errorf("extend epoch record: %w", err)
	}
	m.log.Info("began epoch", "epoch", number, "pcr", m.cfg.PCR)
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
	m.stats.Extends++
	m.stats.ExtendNanos += uint64(d)
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
