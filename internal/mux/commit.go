package mux

import (
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
)

// faultRetry is how often a faulted mux tries to bring the log and the PCR
// back in step.
const faultRetry = time.Second

// Submit queues records for VM id and returns a ticket that completes when
// all of them are durable and extended. Records are numbered in the order
// they are submitted; a teardown record must be the last one and ends the
// VM instance.
func (m *Mux) Submit(id conceal.Digest, recs ...*record.Record) (*Ticket, error) {
	if len(recs) == 0 {
		return nil, errors.New("submit: no records")
	}
	items := make([]*item, len(recs))
	for i, r := range recs {
		switch r.Kind {
		case record.KindGenesis:
			return nil, errors.New("submit: genesis records are made by NewVM only")
		case record.KindMigratedIn:
			return nil, errors.New("submit: migrated-in records are made by MigrateIn only")
		case record.KindMigratedOut:
			return nil, errors.New("submit: migrated-out records are made by MigrateOut only")
		}
		if r.Kind == record.KindTeardown && i != len(recs)-1 {
			return nil, errors.New("submit: a teardown record must come last")
		}
		raw, err := r.Marshal()
		if err != nil {
			return nil, fmt.Errorf("submit: %w", err)
		}
		it := &item{r: raw, h: record.Hash(raw), kind: r.Kind}
		if r.Teardown != nil {
			it.reason = r.Teardown.Reason
		}
		items[i] = it
	}
	return m.enqueue(id, items)
}

func (m *Mux) enqueue(id conceal.Digest, items []*item) (*Ticket, error) {
	t := &Ticket{done: make(chan struct{}), durable: make(chan struct{})}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, ErrClosed
	}
	if m.fault != nil {
		return nil, fmt.Errorf("not acknowledging records: %w", m.fault)
	}
	vs, ok := m.vms[id]
	if !ok {
		return nil, fmt.Errorf("vm %x: %w", id[:8], ErrUnknownVM)
	}
	if vs.ending {
		return nil, fmt.Errorf("vm %s: %w", vs.vm.Name, ErrEnded)
	}
	for _, it := range items {
		it.vm = vs
	}
	if items[len(items)-1].kind.Terminal() {
		vs.ending = true
	}
	items[len(items)-1].ticket = t
	for _, it := range items {
		if urgentKind(it.kind) {
			m.urgent++
		}
	}
	m.queue = append(m.queue, items...)
	m.kick()
	return t, nil
}

// Append submits one record and waits for its acknowledgement.
func (m *Mux) Append(ctx context.Context, id conceal.Digest, r *record.Record) (Ack, error) {
	t, err := m.Submit(id, r)
	if err != nil {
		return Ack{}, err
	}
	return t.Wait(ctx)
}

// Cover configures activity concealment: what one VM's verifier sees of
// the public log (its length, the batch sizes, the VM's own global indices)
// is made independent of the other VMs' activity within an envelope, with
// cover leaves: random 64-byte entries, which cannot be told from real
// (t, c) entries without the VM keys (both are HMAC outputs under keys the
// verifier does not have). The committer then commits on a slot schedule:
// one batch every Interval while any VM instance is live, padded with cover
// leaves to a multiple of Pad leaves, with the real leaves at random
// positions (each VM's in its own order). Within the envelope, at most Pad
// real records per slot across all VMs, every batch is exactly Pad leaves
// at exactly one per slot, and a VM's records sit at uniformly random
// positions of their batch, whatever the others do. Above it, batch sizes
// grow in steps of Pad, and a queue of Flush records commits at once
// (off the schedule), which shows. docs/security.md states what remains.
type Cover struct {
	// Pad pads every batch to a multiple of this many leaves (≥ 1 batch
	// of Pad); 0 turns concealment off.
	Pad int
	// Interval is the slot: one batch per Interval while any VM is live,
	// cover only if nothing is queued. Must be set with Pad.
	Interval time.Duration
	// Flush is the queue length that commits at once instead of waiting
	// for the slot (default 4 × Pad): heavy activity is above the
	// envelope anyway, and must not wait.
	Flush int
	// Rand is the randomness of cover entries and positions; default
	// crypto/rand. Tests pass a seeded stream so that statistics over
	// runs are reproducible.
	Rand io.Reader
}

func (c Cover) on() bool { return c.Pad > 0 && c.Interval > 0 }

func (c Cover) flush() int {
	if c.Flush > 0 {
		return c.Flush
	}
	return 4 * c.Pad
}

func (c Cover) rand() io.Reader {
	if c.Rand != nil {
		return c.Rand
	}
	return crand.Reader
}

// coverState is the committer's slot schedule.
type coverState struct {
	once sync.Once
	kick chan struct{} // a slot now (tests: TriggerSlot)
	// Slots and CoverLeaves count heartbeat batches and cover entries.
	slots, coverLeaves uint64
}

func (c *coverState) kicks() chan struct{} {
	c.once.Do(func() { c.kick = make(chan struct{}, 1) })
	return c.kick
}

// run is the committer: while one batch is being made durable and extended,
// the next one fills in the queue. With Cover on, it commits at slots (and
// when the queue reaches Cover.Flush).
func (m *Mux) run(ctx context.Context) {
	defer close(m.done)
	cv := m.cfg.Cover
	nextSlot := time.Now().Add(cv.Interval)
	for {
		m.mu.Lock()
		faulted := m.fault != nil
		n := len(m.queue)
		closed := m.closed
		live := len(m.vms)
		urgent := m.urgent
		m.mu.Unlock()
		if faulted {
			m.tryHeal(ctx)
		}
		slot := false
		if cv.on() {
			if now := time.Now(); !now.Before(nextSlot) {
				slot = true
				for !nextSlot.After(now) {
					nextSlot = nextSlot.Add(cv.Interval)
				}
			}
		}
		var commitNow bool
		switch {
		case !cv.on() || closed:
			commitNow = n > 0
		case n >= cv.flush():
			commitNow = true
		case urgent > 0:
			// A vTPM event or a migration record: the guest kernel's
			// command, or the migrated guest, waits for it, so it is not
			// held for the slot. Its batch is padded like any other;
			// its time shows (docs/security.md).
			commitNow = true
		case slot:
			// A heartbeat while any VM is live, cover only if need be; none
			// while faulted (it would fail and say nothing).
			commitNow = n > 0 || (live > 0 && !faulted)
		}
		if !commitNow {
			if n == 0 && closed {
				m.commitMu.Lock()
				m.waitExtendedLocked()
				m.commitMu.Unlock()
				return
			}
			wait := faultRetry
			if cv.on() {
				wait = min(wait, time.Until(nextSlot))
			}
			t := time.NewTimer(wait)
			select {
			case <-m.wake:
			case <-t.C:
			case <-m.cover.kicks():
				nextSlot = time.Now()
			}
			t.Stop()
			continue
		}
		m.mu.Lock()
		take := min(len(m.queue), m.cfg.MaxBatch)
		batch := m.queue[:take:take]
		m.queue = m.queue[take:]
		for _, it := range batch {
			if urgentKind(it.kind) {
				m.urgent--
			}
		}
		if len(m.queue) == 0 {
			m.queue = nil
		}
		m.mu.Unlock()
		m.commitMu.Lock()
		err := m.commit(ctx, batch)
		m.commitMu.Unlock()
		if err != nil {
			m.failAll(batch, err)
		}
	}
}

// inflightExtend is the extend of a durable batch, running while the
// committer writes the next batch.
type inflightExtend struct {
	done chan struct{}
	err  error // set before done is closed
	prev *inflightExtend
}

// waitExtendedLocked waits until no extend runs: then PCR p holds the value
// the store replays to (or the mux is faulted). It runs under commitMu, so
// no new one can start.
func (m *Mux) waitExtendedLocked() error {
	if x := m.inflight; x != nil {
		<-x.done
		return x.err
	}
	return nil
}

// commit makes one batch durable, then waits for the previous batch's
// extend (which ran while this one was written) and starts this one's, which
// acknowledges the batch when it is done: a durable record is acknowledged
// as durable at once, as anchored one extend later, and the extends stay in
// the order of the batches. An error means the batch is not acknowledged
// (durable or not). It runs under commitMu.
// With Cover on, the batch is padded with cover entries and the real
// entries sit at random positions (coverSlots).
func (m *Mux) commit(ctx context.Context, items []*item) error {
	n := len(items)
	total := n
	var slots []int
	if cv := m.cfg.Cover; cv.on() {
		total = max(cv.Pad, (n+cv.Pad-1)/cv.Pad*cv.Pad)
		var err error
		if slots, err = coverSlots(items, total, cv.rand()); err != nil {
			return err
		}
	}
	g0 := m.nextG
	index := m.nextBatch
	entries := make([]byte, total*conceal.EntrySize)
	if total > n {
		if _, err := io.ReadFull(m.cfg.Cover.rand(), entries); err != nil {
			return fmt.Errorf("cover entries: %w", err)
		}
	}
	puts := make([]logstore.Put, n)
	acks := make([]Ack, n)
	bh := conceal.NewBatchHasher(g0, uint32(total))
	type saved struct {
		vs   *vmState
		prev logstore.VM
	}
	var touched []saved
	var opens [][32]byte
	seen := make(map[*vmState]bool)
	for i, it := range items {
		vs := it.vm
		if !seen[vs] {
			seen[vs] = true
			touched = append(touched, saved{vs, vs.vm})
		}
		s := vs.vm.NextSeq
		vs.vm.NextSeq++
		t := vs.keys.Tag(s)
		c := vs.keys.Commit(vs.id, s, it.h)
		pos := i
		if slots != nil {
			pos = slots[i]
		}
		e := entries[pos*conceal.EntrySize:]
		copy(e, t[:])
		copy(e[32:], c[:])
		if slots == nil {
			bh.Add(conceal.Leaf(t, c))
		}
		g := g0 + uint64(pos)
		puts[i] = logstore.Put{ID: vs.id, Record: logstore.Record{Seq: s, G: g, Batch: index, R: it.r}}
		acks[i] = Ack{Seq: s, G: g, Batch: index}
		if it.kind == record.KindMigratedIn {
			opens = append(opens, vs.id)
		}
		if it.kind.Terminal() {
			vs.vm.Ended, vs.vm.EndedBy, vs.vm.EndedAt = true, it.reason, m.cfg.Now().UnixNano()
		}
	}
	if slots != nil {
		var t, c conceal.Digest
		for pos := range total {
			e := entries[pos*conceal.EntrySize:]
			copy(t[:], e[:32])
			copy(c[:], e[32:64])
			bh.Add(conceal.Leaf(t, c))
		}
	}
	v, _ := bh.Sum()
	cm := &logstore.Commit{
		Epoch:   m.epoch,
		Index:   index,
		Batch:   logstore.Batch{G0: g0, N: uint32(total), Entries: entries, V: v},
		Records: puts,
		Opens:   opens,
	}
	for _, s := range touched {
		cm.VMs = append(cm.VMs, s.vs.vm)
	}
	if err := m.store.Commit(cm); err != nil {
		for _, s := range touched {
			s.vs.vm = s.prev
		}
		m.setFault(fmt.Errorf("log store write failed: %w", err))
		return err
	}
	markDurable(items)
	m.nextG += uint64(total)
	m.nextBatch++
	m.pcrValue = conceal.ExtendPCR(m.pcrValue, v)
	m.cover.coverLeaves += uint64(total - n)
	if n == 0 {
		m.cover.slots++
	}
	var ended []conceal.Digest
	for _, s := range touched {
		if s.vs.vm.Ended {
			ended = append(ended, s.vs.id)
		}
	}
	if m.extendSlots == nil {
		m.extendSlots = make(chan struct{}, maxInflight)
	}
	m.extendSlots <- struct{}{} // at most maxInflight extends behind the writer
	x := &inflightExtend{done: make(chan struct{}), prev: m.inflight}
	m.inflight = x
	go m.finishBatch(ctx, x, index, v, items, acks, ended, total)
	return nil
}

// finishBatch extends a durable batch's digest and then acknowledges its
// records; on failure the mux is faulted and the batch (with all queued
// behind it) fails, durable but not acknowledged.
func (m *Mux) finishBatch(ctx context.Context, x *inflightExtend, index uint64, v conceal.Digest, items []*item, acks []Ack, ended []conceal.Digest, total int) {
	defer func() { <-m.extendSlots }()
	if p := x.prev; p != nil {
		<-p.done
		x.prev = nil
		if p.err != nil {
			x.err = fmt.Errorf("batch %d is durable but not extended: a batch before it was not: %w", index, p.err)
			close(x.done)
			m.failAll(items, x.err)
			return
		}
	}
	if err := m.extend(ctx, v); err != nil {
		m.setFault(fmt.Errorf("extend batch %d: %w", index, err))
		x.err = fmt.Errorf("extend batch %d (durable, not acknowledged): %w", index, err)
		close(x.done)
		m.failAll(items, x.err)
		return
	}
	m.smu.Lock()
	m.stats.Batches++
	m.stats.Records += uint64(len(items))
	m.stats.MaxBatch = max(m.stats.MaxBatch, len(items))
	m.smu.Unlock()
	m.observeBatch(total)
	if len(ended) > 0 {
		m.mu.Lock()
		for _, id := range ended {
			delete(m.vms, id)
		}
		m.mu.Unlock()
	}
	close(x.done)
	ackAll(items, acks)
}

// markDurable tells the submissions of a batch that it is in the store.
func markDurable(items []*item) {
	for _, it := range items {
		if it.ticket != nil {
			close(it.ticket.durable)
		}
	}
}

// coverSlots places n real entries among total: a uniformly random set of
// positions for each VM's entries, whatever the other VMs' entries are,
// assigned to that VM's entries in their order (a VM's records must sit at
// increasing global indices). It draws a uniformly random injection of the
// entries into the positions (a partial Fisher-Yates shuffle), then sorts
// each VM's positions.
func coverSlots(items []*item, total int, r io.Reader) ([]int, error) {
	var seed [32]byte
	if _, err := io.ReadFull(r, seed[:]); err != nil {
		return nil, fmt.Errorf("cover positions: %w", err)
	}
	rng := mrand.New(mrand.NewChaCha8(seed))
	perm := make([]int, total)
	for i := range perm {
		perm[i] = i
	}
	for i := range items {
		j := i + rng.IntN(total-i)
		perm[i], perm[j] = perm[j], perm[i]
	}
	slots := perm[:len(items)]
	byVM := make(map[*vmState][]int)
	for i, it := range items {
		byVM[it.vm] = append(byVM[it.vm], i)
	}
	for _, idx := range byVM {
		if len(idx) < 2 {
			continue
		}
		pos := make([]int, len(idx))
		for k, i := range idx {
			pos[k] = slots[i]
		}
		slices.Sort(pos)
		for k, i := range idx {
			slots[i] = pos[k]
		}
	}
	return slices.Clone(slots), nil
}

// CoverStats reports the heartbeat batches (slots with nothing real to
// commit) and the cover entries committed since Open.
func (m *Mux) CoverStats() (heartbeats, coverLeaves uint64) {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	return m.cover.slots, m.cover.coverLeaves
}

func ackAll(items []*item, acks []Ack) {
	for i, it := range items {
		if it.ticket != nil {
			it.ticket.ack = acks[i]
			close(it.ticket.done)
		}
	}
}

// failAll fails the batch and everything queued behind it: a submission
// whose earlier records failed must not have its later records land, or the
// guest's log would get a gap.
func (m *Mux) failAll(batch []*item, err error) {
	m.mu.Lock()
	rest := m.queue
	m.queue = nil
	m.urgent = 0
	for _, it := range rest {
		if it.kind.Terminal() {
			it.vm.ending = false
		}
	}
	for _, it := range batch {
		if it.kind.Terminal() && !it.vm.vm.Ended {
			it.vm.ending = false
		}
	}
	m.mu.Unlock()
	for _, list := range [][]*item{batch, rest} {
		for _, it := range list {
			if it.ticket != nil {
				it.ticket.err = fmt.Errorf("records not acknowledged: %w", err)
				close(it.ticket.done)
			}
		}
	}
}

func (m *Mux) setFault(err error) {
	m.mu.Lock()
	m.fault = err
	m.mu.Unlock()
	m.log.Error("multiplexer faulted: not acknowledging records or serving evidence until the log and PCR are back in step", "err", err)
}

// tryHeal checks whether the PCR is back in step with the store: it equals
// the replay (the last extend did happen), or equals the value before the
// last batch (extend it now).
func (m *Mux) tryHeal(ctx context.Context) {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.mu.Lock()
	fault := m.fault
	m.mu.Unlock()
	var rf *ReplayError
	if fault == nil || errors.As(fault, &rf) {
		return // a replay mismatch needs an operator, not a retry
	}
	hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := m.healLocked(hctx); err != nil {
		m.log.Warn("multiplexer still faulted", "err", err)
		return
	}
	m.inflight = nil // its failure is repaired
	m.mu.Lock()
	m.fault = nil
	m.mu.Unlock()
	m.log.Info("multiplexer recovered: log and PCR in step")
}

func (m *Mux) healLocked(ctx context.Context) error {
	m.waitExtendedLocked()
	vals, err := m.tpm.ReadPCRs(ctx, []int{m.cfg.PCR})
	if err != nil {
		return fmt.Errorf("read pcr %d: %w", m.cfg.PCR, err)
	}
	if vals[0] == m.pcrValue {
		return nil
	}
	rp, err := m.replay(logstore.EpochInfo{Number: m.epoch}, m.epochInfo.StartValue)
	if err != nil {
		return err
	}
	if rp.value != m.pcrValue {
		return fmt.Errorf("store replays to %x, expected %x", rp.value[:8], m.pcrValue[:8])
	}
	if ok, err := m.catchUp(ctx, rp, vals[0]); ok {
		return err
	}
	rerr := &ReplayError{PCR: m.cfg.PCR, Got: vals[0], Want: m.pcrValue, Epoch: m.epoch, Batches: m.nextBatch}
	m.mu.Lock()
	m.fault = rerr
	m.mu.Unlock()
	return rerr
}

// urgentKind reports whether a record of kind k is committed at once
// rather than held for the next concealment slot: a vTPM event (the guest
// kernel's command waits on it) and the migration records (the migrated
// guest's agent and vTPM on the destination wait for the handover, which
// waits for both). Their batches are padded like any other; their times
// show (docs/security.md).
func urgentKind(k record.Kind) bool {
	return k == record.KindTPM || k == record.KindMigratedOut || k == record.KindMigratedIn
}
