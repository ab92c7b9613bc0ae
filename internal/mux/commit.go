package mux

import (
	"cmp"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"runtime"
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
	return m.submit(id, waitAck, recs...)
}

// waitFor is what a submitter waits for; it tells the committer whom
// holding a batch back would delay.
type waitFor uint8

const (
	waitAck     waitFor = iota // the acknowledgement (Ticket.Wait)
	waitDurable                // durability only: never held back
	waitExtend                 // the extend: gathered for (gatherWait)
)

func (m *Mux) submit(id conceal.Digest, w waitFor, recs ...*record.Record) (*Ticket, error) {
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
	items[len(items)-1].wait = w
	return m.enqueue(id, items)
}

func (m *Mux) enqueue(id conceal.Digest, items []*item) (*Ticket, error) {
	t := &Ticket{done: make(chan struct{}), durable: make(chan struct{}), extended: make(chan struct{}), urgent: m.urgentApply}
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
	last := items[len(items)-1]
	last.ticket = t
	w := last.wait
	for _, it := range items {
		if urgentKind(it.kind) {
			m.urgent++
		}
	}
	if w == waitDurable {
		m.durableWaiters++
	}
	m.queue = append(m.queue, items...)
	g := &m.regather
	if g.want > 0 {
		g.last = time.Now()
		if g.holding && len(m.queue) < g.want && w != waitDurable {
			// The committer gathers on its timer; a wake per guest
			// would only cost CPU.
			return t, nil
		}
	}
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

// run is the committer. Each round is one group: the records queued since
// the last one are staged in the write-ahead log and, when fewer than
// maxInflight batches are being applied and extended, a batch of the
// staged records not yet batched (pending) goes into the same write, one
// fdatasync for both. A staged record is durable, and acknowledged as
// such, at once; its batch follows at the pace of the extends. With Cover
// on, it commits at slots (and when the queue reaches Cover.Flush).
func (m *Mux) run(ctx context.Context) {
	defer close(m.done)
	cv := m.cfg.Cover
	nextSlot := time.Now().Add(cv.Interval)
	// due says a slot passed and no batch has been made since: the
	// heartbeat waits for a free extend (and for answered anchored guests,
	// gatherWait) without holding the committer, so records queued
	// meanwhile are staged at once and ride in it.
	due := false
	for {
		m.mu.Lock()
		faulted := m.fault != nil
		n := len(m.queue)
		np := len(m.pending)
		unheld := np - m.pendingHeld
		closed := m.closed
		if closed {
			unheld = np
		}
		live := len(m.vms)
		urgent := m.urgent
		durableOnly := m.durableWaiters > 0
		now := time.Now()
		gather := m.gatherWait(n, now)
		pace := m.paceWait(unheld, now)
		m.regather.holding = false
		m.mu.Unlock()
		if faulted {
			m.tryHeal(ctx)
		}
		if cv.on() {
			if now := time.Now(); !now.Before(nextSlot) {
				due = true
				for !nextSlot.After(now) {
					nextSlot = nextSlot.Add(cv.Interval)
				}
			}
		}
		if faulted || (live == 0 && n == 0) {
			due = false // none while faulted (it would fail and say nothing)
		}
		extendBusy := len(m.extendSlots) >= maxInflight
		var commitNow, heartbeat bool
		switch {
		case !cv.on() || closed:
			commitNow = n > 0
		case n+np-unheld >= cv.flush():
			// Held records count: they were queued until a stage-only
			// group staged them.
			commitNow = true
		case urgent > 0:
			// A vTPM event or a migration record: the guest kernel's
			// command, or the migrated guest, waits for it, so it is not
			// held for the slot. Its batch is padded like any other;
			// its time shows (docs/security.md).
			commitNow = true
		case due && extendBusy:
			// The heartbeat waits for the extend; new records are staged.
			commitNow = n > 0
		case due:
			// A heartbeat while any VM is live, cover only if need be.
			commitNow, heartbeat = true, true
		}
		// Staged records wait for a batch only while the extends are busy
		// (held ones for a batch made anyway).
		// Records only durability was asked for are paced (durablePace).
		if !commitNow && unheld > 0 && !faulted && !extendBusy && (pace == 0 || closed) {
			commitNow = true
		}
		// A record whose submitter waits for durability only, not urgent
		// (a VM's genesis), is staged at once but held for a batch made
		// anyway: the VM starts without waiting for the slot, and its
		// start does not show off the schedule.
		stageOnly := false
		if !commitNow && cv.on() && durableOnly {
			commitNow, stageOnly = true, true
		}
		if commitNow && gather > 0 && !closed && !faulted {
			commitNow = false
			m.mu.Lock()
			m.regather.holding = true
			m.mu.Unlock()
		} else {
			gather = 0
		}
		if !commitNow {
			if n == 0 && closed && (np == 0 || faulted) {
				m.commitMu.Lock()
				m.waitExtendedLocked()
				m.commitMu.Unlock()
				if np > 0 {
					// Durable, batched by the next start.
					m.failAll(nil, ErrClosed)
				}
				return
			}
			wait := faultRetry
			if cv.on() {
				wait = min(wait, time.Until(nextSlot))
			}
			if gather > 0 {
				wait = min(wait, gather)
			}
			if pace > 0 && unheld > 0 {
				wait = min(wait, pace)
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
			if it.wait == waitDurable {
				m.durableWaiters--
			}
		}
		m.regather = gatherState{}
		if len(m.queue) == 0 {
			m.queue = nil
		}
		m.mu.Unlock()
		m.commitMu.Lock()
		batches := m.nextBatch
		err := m.commit(ctx, batch, heartbeat && !faulted, !stageOnly)
		if m.nextBatch != batches {
			due = false
		}
		m.commitMu.Unlock()
		if err != nil {
			m.failAll(batch, err)
		}
	}
}

// inflightExtend is a durable batch on its way into bbolt and the TPM,
// while the committer writes the next groups.
type inflightExtend struct {
	cm       *logstore.Commit
	release  uint64        // write-ahead log frames before it are applied once cm is
	applied  chan struct{} // cm is in bbolt (or applyErr)
	applyErr error
	extended chan struct{} // the extend ran (err says whether it failed)
	done     chan struct{} // both, and its records are acknowledged or failed
	err      error         // set before extended is closed
	prev     *inflightExtend
}

// waitExtendedLocked waits until every staged record is batched (unless
// the mux is faulted; held records only once it is closing) and no batch
// is being applied or extended: then PCR p holds the value the store
// replays to, and bbolt holds every durable record but the held ones (or
// the mux is faulted). It runs under commitMu, so nothing new is staged
// meanwhile. It never batches for held records alone: a quote asked for by
// one VM's verifier must not show that another VM just started.
func (m *Mux) waitExtendedLocked() error {
	for {
		var err error
		if x := m.inflight; x != nil {
			done := m.urgentApply()
			<-x.done
			done()
			err = cmp.Or(x.err, x.applyErr)
		}
		m.mu.Lock()
		np, faulted := len(m.pending)-m.pendingHeld, m.fault != nil
		if m.closed {
			np = len(m.pending)
		}
		m.mu.Unlock()
		if np == 0 || faulted || err != nil {
			return err
		}
		ctx := m.runCtx
		if ctx == nil {
			ctx = context.Background()
		}
		if err := m.commit(ctx, nil, false, true); err != nil {
			return err
		}
	}
}

// syncStore waits until bbolt holds every record staged so far (see
// waitExtendedLocked), for readers of the store that must see them all.
func (m *Mux) syncStore() {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.waitExtendedLocked()
}

// syncVM is syncStore for readers of VM id's records only: it returns at
// once when bbolt holds all of them already (the usual case). Records of
// id held for the slot (pendingHeld) it waits for, at most one slot.
func (m *Mux) syncVM(id conceal.Digest) {
	m.mu.Lock()
	vs, ok := m.vms[id]
	m.mu.Unlock()
	if !ok {
		return
	}
	m.commitMu.Lock()
	want := vs.vm.NextSeq
	m.commitMu.Unlock()
	if m.storedSeq(id) >= want {
		return
	}
	m.syncStore()
	m.awaitStored(context.Background(), id, want)
}

// storedSeq is VM id's NextSeq as bbolt holds it; 0 if it holds no
// record of id.
func (m *Mux) storedSeq(id conceal.Digest) uint64 {
	var n uint64
	m.store.View(func(sn *logstore.Snapshot) error {
		if vm, err := sn.VM(id); err == nil {
			n = vm.NextSeq
		}
		return nil
	})
	return n
}

// heldPoll is how often a reader waiting for a live VM's held records
// (a genesis staged before the slot that batches it) looks again.
const heldPoll = 5 * time.Millisecond

// awaitStored waits until bbolt holds VM id's records before seq want,
// while id is live and the mux neither closed nor faulted. It is for
// records held for the slot: the next slot (Cover.Interval) batches them,
// and a batch made sooner for other reasons takes them too. Waiting here,
// rather than batching at once, keeps a VM's start off the schedule that
// the other VMs see.
func (m *Mux) awaitStored(ctx context.Context, id conceal.Digest, want uint64) {
	t := time.NewTicker(heldPoll)
	defer t.Stop()
	for m.storedSeq(id) < want {
		m.mu.Lock()
		_, live := m.vms[id]
		stop := !live || m.closed || m.fault != nil
		m.mu.Unlock()
		if stop {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-m.done:
			return
		case <-t.C:
		}
	}
}

// awaitGenesis waits, for a reader of VM id's state, until bbolt holds
// the record that opened id's stay here, if it is live and that record is
// still held for the slot (NewVM returns once it is durable).
// It takes no lock a quote holds: evidence requests call it.
func (m *Mux) awaitGenesis(ctx context.Context, id conceal.Digest) {
	m.mu.Lock()
	vs, ok := m.vms[id]
	m.mu.Unlock()
	if !ok {
		return
	}
	want := vs.heldUntil.Load()
	if want == 0 {
		return
	}
	m.awaitStored(ctx, id, want)
	if m.storedSeq(id) >= want {
		vs.heldUntil.CompareAndSwap(want, 0)
	}
}

// stagedVM is a VM's state before a group staged its records, to restore
// if the write fails.
type stagedVM struct {
	vs   *vmState
	prev logstore.VM
}

// commit is one group (under commitMu): it numbers the new items, stages
// them in the write-ahead log and, if an extend slot is free (heartbeat:
// waiting for one), batches the pending records with them in the same
// write. The new items are durable once it returns nil. The batch is then
// applied to bbolt and extended behind it (finishBatch), in order, and its
// records acknowledged: a durable record is acknowledged as durable at
// once, as anchored once its batch is extended. An error means the new
// items were not written (durable or not). With batch false it only
// stages the new items, held (see pendingHeld).
func (m *Mux) commit(ctx context.Context, items []*item, heartbeat, batch bool) error {
	var touched []stagedVM
	seen := make(map[*vmState]bool)
	staged := make([]logstore.Staged, 0, len(items))
	for _, it := range items {
		vs := it.vm
		if !seen[vs] {
			seen[vs] = true
			touched = append(touched, stagedVM{vs, vs.vm})
		}
		st := logstore.Staged{Epoch: m.epoch, ID: vs.id, Seq: vs.vm.NextSeq, R: it.r}
		if it.kind == record.KindGenesis || it.kind == record.KindMigratedIn {
			v := vs.vm
			st.VM = &v
		}
		it.seq = vs.vm.NextSeq
		vs.vm.NextSeq++
		if it.kind.Terminal() {
			vs.vm.Ended, vs.vm.EndedBy, vs.vm.EndedAt = true, it.reason, m.cfg.Now().UnixNano()
		}
		staged = append(staged, st)
	}
	m.mu.Lock()
	cands := slices.Concat(m.pending, items)
	faulted := m.fault != nil
	m.mu.Unlock()
	slotTaken := false
	// No batch while faulted: the heal must find the store and the PCR
	// as the fault left them; staged records wait for it.
	// Only commit takes slots, under commitMu: a free one stays free.
	if !faulted && batch && len(m.extendSlots) < maxInflight && (len(cands) > 0 || heartbeat) {
		m.extendSlots <- struct{}{}
		slotTaken = true
	}
	restore := func() {
		for _, s := range touched {
			s.vs.vm = s.prev
		}
		if slotTaken {
			<-m.extendSlots
		}
	}
	var b *builtBatch
	var rest []*item
	if slotTaken {
		take := min(len(cands), m.cfg.MaxBatch)
		var err error
		if b, err = m.buildBatch(cands[:take]); err != nil {
			restore()
			return err
		}
		rest = cands[take:]
	} else {
		rest = cands
	}
	var cm *logstore.Commit
	if b != nil {
		cm = b.cm
		if len(rest) == 0 {
			// The batch holds every new item (and their VMs' states):
			// its frame is their durable copy, and a frame of staged
			// records would write and encode them twice.
			staged = nil
		}
	}
	if len(staged) == 0 && cm == nil {
		restore()
		return nil
	}
	rFrame, bFrame, err := m.store.Stage(staged, cm)
	if err != nil {
		restore()
		m.setFault(fmt.Errorf("write-ahead log write failed: %w", err))
		return err
	}
	m.smu.Lock()
	m.stats.Writes++
	m.smu.Unlock()
	for _, it := range items {
		it.frame = rFrame
	}
	m.mu.Lock()
	if len(rest) > 0 && (len(m.pending) == 0 || b != nil) {
		m.pendingSince = time.Now()
	}
	m.pending = slices.Clip(rest)
	m.pendingAcked = 0
	for _, it := range rest {
		if it.wait != waitDurable {
			m.pendingAcked++
		}
	}
	if batch {
		// What a batch left over waits only for a free extend.
		m.pendingHeld = 0
	} else {
		m.pendingHeld += len(items)
		for _, it := range items {
			if it.kind == record.KindGenesis {
				it.vm.heldUntil.Store(it.seq + 1)
			}
		}
	}
	m.mu.Unlock()
	markDurable(items)
	if len(items) > 0 {
		// The guests just woken are queued on this goroutine's P; let
		// them run before the next group's write and fdatasync (a
		// syscall that keeps the P until the runtime takes it back).
		runtime.Gosched()
	}
	if b == nil {
		return nil
	}
	m.nextG += uint64(b.total)
	m.nextBatch++
	m.pcrValue = conceal.ExtendPCR(m.pcrValue, b.cm.Batch.V)
	m.cover.coverLeaves += uint64(b.total - len(b.items))
	if len(b.items) == 0 {
		m.cover.slots++
	}
	x := &inflightExtend{cm: b.cm, applied: make(chan struct{}), extended: make(chan struct{}), done: make(chan struct{}), prev: m.inflight}
	x.release = bFrame + 1
	if len(rest) > 0 {
		x.release = rest[0].frame
	}
	m.inflight = x
	m.queueApply(x)
	go m.finishBatch(ctx, x, b)
	return nil
}

// builtBatch is a batch of staged items, ready to be written.
type builtBatch struct {
	cm    *logstore.Commit
	items []*item
	acks  []Ack
	ended []conceal.Digest
	total int
}

// buildBatch makes the next batch of staged items (numbered already):
// their entries, padded with cover entries at random positions (Cover
// on), the records' places and each VM's state as of its last record in
// the batch. It changes nothing until the caller commits to it.
func (m *Mux) buildBatch(items []*item) (*builtBatch, error) {
	n := len(items)
	total := n
	var slots []int
	if cv := m.cfg.Cover; cv.on() {
		total = max(cv.Pad, (n+cv.Pad-1)/cv.Pad*cv.Pad)
		var err error
		if slots, err = coverSlots(items, total, cv.rand()); err != nil {
			return nil, err
		}
	}
	g0 := m.nextG
	index := m.nextBatch
	entries := make([]byte, total*conceal.EntrySize)
	if total > n {
		if _, err := io.ReadFull(m.cfg.Cover.rand(), entries); err != nil {
			return nil, fmt.Errorf("cover entries: %w", err)
		}
	}
	puts := make([]logstore.Put, n)
	acks := make([]Ack, n)
	bh := conceal.NewBatchHasher(g0, uint32(total))
	var opens [][32]byte
	last := make(map[*vmState]uint64)
	var order []*vmState
	for i, it := range items {
		vs := it.vm
		if _, ok := last[vs]; !ok {
			order = append(order, vs)
		}
		s := it.seq
		last[vs] = s
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
	var ended []conceal.Digest
	for _, vs := range order {
		vm := vs.vm
		vm.NextSeq = last[vs] + 1
		if vm.NextSeq < vs.vm.NextSeq {
			// Later records are staged, not in this batch: the VM has not
			// ended as far as bbolt is concerned.
			vm.Ended, vm.EndedBy, vm.EndedAt = false, "", 0
		}
		if vm.Ended {
			ended = append(ended, vs.id)
		}
		cm.VMs = append(cm.VMs, vm)
	}
	return &builtBatch{cm: cm, items: items, acks: acks, ended: ended, total: total}, nil
}

// queueApply hands a durable batch to the applier, which writes batches
// into bbolt in order, as many at once as have queued.
func (m *Mux) queueApply(x *inflightExtend) {
	m.amu.Lock()
	m.applyQ = append(m.applyQ, x)
	m.amu.Unlock()
	select {
	case m.applyWake <- struct{}{}:
	default:
	}
}

// applyRetry is how often the applier retries batches bbolt refused, and
// defaultApplyEvery the least time between two bbolt transactions unless
// someone waits for one (urgentApply: an agent's acknowledgement, a quote).
// Only reads wait for bbolt; durable records are in the write-ahead log.
// Each transaction's two fsyncs delay the write-ahead log's fdatasync
// behind them, and with one closed-loop vTPM guest a transaction every
// 4 ms put 3.5% of its stages above 600 µs (0.8% with one a second): the
// commands above P7's target went from 3.7-6.6% to 1.2-1.3% (durable,
// simulator), from 29-33% to 7-10% (anchored, hardware profile), and
// from 17-23% to 8-11% at 10 VMs, with 100 ms; 100 VMs' p50 halved
// (docs/performance.md, 2026-12-07). Its cost: the write-ahead log and
// the applier's queue hold up to 100 ms of batches.
const (
	applyRetry        = 200 * time.Millisecond
	defaultApplyEvery = 100 * time.Millisecond
)

// urgentApply makes the applier write what it holds into bbolt now, and
// keeps it from waiting for more batches until the returned func is
// called: for callers that wait for a batch to be in bbolt (an agent's
// acknowledgement, a quote). A one-shot flush would not do: the applier
// may spend it on the batch before, and hold the awaited one back for a
// whole applyEvery.
func (m *Mux) urgentApply() (done func()) {
	m.applyWaiters.Add(1)
	m.flushApply()
	return func() { m.applyWaiters.Add(-1) }
}

// flushApply asks the applier to write what it holds into bbolt now.
func (m *Mux) flushApply() {
	select {
	case m.applyFlush <- struct{}{}:
	default:
	}
}

// applyLoop is the applier. When bbolt refuses batches (a full disk), the
// mux faults and their records fail (durable in the write-ahead log, not
// acknowledged); the applier keeps them, ahead of any later ones, and
// retries until bbolt takes them, and the mux then heals.
func (m *Mux) applyLoop() {
	defer close(m.applyDone)
	var retry []*logstore.Commit
	var last uint64 // release point of the newest batch handed over
	var applied time.Time
	for {
		m.amu.Lock()
		q := m.applyQ
		m.applyQ = nil
		stop := m.applyStop
		m.amu.Unlock()
		if len(q) == 0 && len(retry) == 0 {
			if stop {
				return
			}
			<-m.applyWake
			continue
		}
		if wait := time.Until(applied.Add(m.applyEvery)); wait > 0 && !stop && len(retry) == 0 && m.applyWaiters.Load() == 0 {
			// Let batches gather: bbolt's two fsyncs a transaction compete
			// with the write-ahead log's, and only reads wait for them
			// (an acknowledgement or a quote asks for them at once:
			// urgentApply).
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-m.applyFlush:
			}
			t.Stop()
			m.amu.Lock()
			q = append(q, m.applyQ...)
			m.applyQ = nil
			m.amu.Unlock()
		}
		cms := retry
		for _, x := range q {
			cms = append(cms, x.cm)
			last = x.release
		}
		err := m.store.Apply(cms)
		if err != nil {
			err = fmt.Errorf("log store apply failed (the batches are durable in the write-ahead log; retrying): %w", err)
			m.setFault(err)
			retry = cms
		} else {
			m.smu.Lock()
			m.stats.Applied += uint64(len(cms))
			m.smu.Unlock()
			retry = nil
			if rerr := m.store.Release(last); rerr != nil {
				m.log.Warn("write-ahead log segments not deleted", "err", rerr)
			}
			applied = time.Now()
		}
		for _, x := range q {
			x.applyErr = err
			x.cm = nil
			close(x.applied)
		}
		if err != nil {
			if stop {
				return // the next start applies them from the write-ahead log
			}
			t := time.NewTimer(applyRetry)
			select {
			case <-t.C:
			case <-m.applyWake:
			}
			t.Stop()
		}
	}
}

// finishBatch applies (through the applier) and extends a durable batch,
// both in the order of the batches, and then acknowledges its records; on
// failure the mux is faulted and the batch (with all queued behind it)
// fails, durable but not acknowledged.
func (m *Mux) finishBatch(ctx context.Context, x *inflightExtend, b *builtBatch) {
	index := b.cm.Index
	v := b.cm.Batch.V
	p := x.prev
	switch {
	case p != nil && func() bool { <-p.extended; return p.err != nil }():
		x.err = fmt.Errorf("batch %d is durable but not extended: a batch before it was not: %w", index, p.err)
	default:
		if err := m.extend(ctx, v); err != nil {
			m.setFault(fmt.Errorf("extend batch %d: %w", index, err))
			x.err = fmt.Errorf("extend batch %d (durable, not acknowledged): %w", index, err)
		}
	}
	close(x.extended)
	if x.err == nil {
		m.startGather(b.items)
	}
	// The slot bounds the batches durable but not extended (what a
	// crash can leave for recovery to extend); bbolt may lag behind. It is
	// free before an anchored guest learns of the extend, so the guest's
	// next event finds it free and is batched in the write that stages it.
	m.freedAt.Store(time.Now().UnixNano())
	<-m.extendSlots
	m.kick()
	if x.err == nil {
		// Durable and extended: what a guest's acknowledgement and the
		// metrics count (bbolt follows; Stats.Applied).
		m.smu.Lock()
		m.stats.Batches++
		m.stats.Records += uint64(len(b.items))
		m.stats.MaxBatch = max(m.stats.MaxBatch, len(b.items))
		m.smu.Unlock()
		m.observeBatch(b.total)
		for _, it := range b.items {
			if it.ticket != nil {
				close(it.ticket.extended)
			}
		}
	}
	<-x.applied
	if p != nil {
		<-p.done
	}
	x.prev = nil
	if err := cmp.Or(x.err, x.applyErr); err != nil {
		close(x.done)
		m.failAll(b.items, err)
		return
	}
	if len(b.ended) > 0 {
		m.mu.Lock()
		for _, id := range b.ended {
			delete(m.vms, id)
		}
		m.mu.Unlock()
	}
	close(x.done)
	ackAll(b.items, b.acks)
}

// Gathering. A batch's extend answers its anchored guests all at once,
// and each comes back a moment later with its next event (a guest
// kernel's IMA extends one file after another). Cutting the next batch as
// soon as the first of them is queued would leave the rest staged behind
// it, each waiting for that batch's whole extend and then its own: about
// two extends a command. So after an extend that answered anchored
// guests the committer holds the next batch until as many records are
// queued as guests were answered, or none has come for gatherIdle (or a
// sixth of the last extend, if longer), or gatherMax (or the last
// extend, if longer) has passed since the extend, whichever is first. A
// record whose guest waits only for durability ends the wait at once.
// With 100 vTPM guests answering through their sockets on the hardware
// profile a fixed 1 ms cut the batches at about half of them
// (docs/performance.md, P7).
const (
	gatherIdle = 150 * time.Microsecond
	gatherMax  = time.Millisecond
)

// gatherState is the committer's wait for answered anchored guests.
type gatherState struct {
	want  int       // anchored guests the last extend answered; 0: none
	since time.Time // that extend's end
	last  time.Time // the last record queued since
	// holding says the committer sleeps until gatherWait has passed
	// (enqueue need not wake it before the queue reaches want).
	holding bool
}

// startGather starts gathering for the anchored guests among items, a
// batch just extended.
func (m *Mux) startGather(items []*item) {
	n := 0
	for _, it := range items {
		if it.wait == waitExtend {
			n++
		}
	}
	if n == 0 {
		return
	}
	now := time.Now()
	m.mu.Lock()
	m.regather = gatherState{want: n, since: now, last: now}
	m.mu.Unlock()
}

// gatherWait is how much longer the committer holds the next batch for
// answered anchored guests, with n records queued at now; 0: commit now.
// It runs under mu.
func (m *Mux) gatherWait(n int, now time.Time) time.Duration {
	g := &m.regather
	if g.want == 0 || n >= g.want || m.durableWaiters > 0 {
		return 0
	}
	// On a slow TPM the cap and the gap grow with the extend: holding the
	// batch for up to one extend costs the guests already queued no more
	// than a split would cost the rest.
	ext := time.Duration(m.lastExtend.Load())
	end := g.since.Add(max(gatherMax, ext))
	if idle := g.last.Add(max(gatherIdle, ext/6)); idle.Before(end) {
		end = idle
	}
	if !end.After(now) {
		return 0
	}
	return end.Sub(now)
}

// Pacing. A record whose submitter waits for durability only (a vTPM
// event in mode durable, a genesis) is acknowledged once staged; its batch
// need not follow at once. When such records are staged while an extend
// is busy, cutting their batch the moment it frees costs a write and an
// fdatasync of their own, and the next guest command, arriving meanwhile,
// waits for that fdatasync before its own: with one closed-loop guest a
// fifth of the commands paid two fsyncs (P7). So the committer holds such
// a batch until a new record comes (their batch then rides in the write
// that stages it), durablePaceMax of them are pending, or durablePace has
// passed since the extend freed (and since the oldest was staged). Anyone
// waiting for more than durability (an agent's acknowledgement, an
// anchored guest, a quote: waitExtendedLocked) ends the wait. The pace only moves batches that are made anyway, by at most
// durablePace, and only while records arrive: it shows nothing a batch
// cut at once would not.
const (
	durablePace    = 2 * time.Millisecond
	durablePaceMax = 64
)

// paceWait is how much longer the committer holds the batch of unheld
// pending records, all durable-only (see durablePace); 0: batch them now.
// It runs under mu.
func (m *Mux) paceWait(unheld int, now time.Time) time.Duration {
	if unheld == 0 || unheld >= durablePaceMax || m.pendingAcked > 0 {
		return 0
	}
	from := m.pendingSince
	if f := time.Unix(0, m.freedAt.Load()); f.After(from) {
		from = f
	}
	return max(0, from.Add(durablePace).Sub(now))
}

// markDurable tells the submissions of a group that they are staged.
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
			it.ticket.finish(acks[i], nil)
		}
	}
}

// failAll fails the batch and everything queued behind it: a submission
// whose earlier records failed must not have its later records land, or the
// guest's log would get a gap. Staged records waiting for a batch fail too
// (durable, not acknowledged) but stay staged: the committer batches them
// once the mux has healed.
func (m *Mux) failAll(batch []*item, err error) {
	m.mu.Lock()
	rest := slices.Concat(m.pending, m.queue)
	m.queue = nil
	m.urgent = 0
	m.durableWaiters = 0
	m.regather = gatherState{}
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
				it.ticket.finish(Ack{}, fmt.Errorf("records not acknowledged: %w", err))
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
