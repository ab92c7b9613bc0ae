package mux

import (
	"context"
	"errors"
	"fmt"
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
		if r.Kind == record.KindGenesis {
			return nil, errors.New("submit: genesis records are made by NewVM only")
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
	if items[len(items)-1].kind == record.KindTeardown {
		vs.ending = true
	}
	items[len(items)-1].ticket = t
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

// run is the committer: while one batch is being made durable and extended,
// the next one fills in the queue.
func (m *Mux) run(ctx context.Context) {
	defer close(m.done)
	for {
		m.mu.Lock()
		faulted := m.fault != nil
		n := len(m.queue)
		closed := m.closed
		m.mu.Unlock()
		if faulted {
			m.tryHeal(ctx)
		}
		if n == 0 {
			if closed {
				return
			}
			select {
			case <-m.wake:
			case <-time.After(faultRetry):
			}
			continue
		}
		m.mu.Lock()
		take := min(len(m.queue), m.cfg.MaxBatch)
		batch := m.queue[:take:take]
		m.queue = m.queue[take:]
		if len(m.queue) == 0 {
			m.queue = nil
		}
		m.mu.Unlock()
		m.commitMu.Lock()
		ack, err := m.commit(ctx, batch)
		m.commitMu.Unlock()
		if err != nil {
			m.failAll(batch, err)
			continue
		}
		ackAll(batch, ack)
	}
}

// commit makes one batch durable and extends it. It runs under commitMu.
func (m *Mux) commit(ctx context.Context, items []*item) ([]Ack, error) {
	n := len(items)
	g0 := m.nextG
	index := m.nextBatch
	entries := make([]byte, 0, n*conceal.EntrySize)
	puts := make([]logstore.Put, n)
	acks := make([]Ack, n)
	bh := conceal.NewBatchHasher(g0, uint32(n))
	type saved struct {
		vs   *vmState
		prev logstore.VM
	}
	var touched []saved
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
		entries = append(entries, t[:]...)
		entries = append(entries, c[:]...)
		bh.Add(conceal.Leaf(t, c))
		g := g0 + uint64(i)
		puts[i] = logstore.Put{ID: vs.id, Record: logstore.Record{Seq: s, G: g, Batch: index, R: it.r}}
		acks[i] = Ack{Seq: s, G: g, Batch: index}
		if it.kind == record.KindTeardown {
			vs.vm.Ended, vs.vm.EndedBy, vs.vm.EndedAt = true, it.reason, m.cfg.Now().UnixNano()
		}
	}
	v, _ := bh.Sum()
	c := &logstore.Commit{
		Epoch:   m.epoch,
		Index:   index,
		Batch:   logstore.Batch{G0: g0, N: uint32(n), Entries: entries, V: v},
		Records: puts,
	}
	for _, s := range touched {
		c.VMs = append(c.VMs, s.vs.vm)
	}
	if err := m.store.Commit(c); err != nil {
		for _, s := range touched {
			s.vs.vm = s.prev
		}
		m.setFault(fmt.Errorf("log store write failed: %w", err))
		return nil, err
	}
	markDurable(items)
	m.nextG += uint64(n)
	m.nextBatch++
	m.pcrPrev, m.pcrValue = m.pcrValue, conceal.ExtendPCR(m.pcrValue, v)
	if err := m.extend(ctx, v); err != nil {
		m.setFault(fmt.Errorf("extend batch %d: %w", index, err))
		return nil, fmt.Errorf("extend batch %d (durable, not acknowledged): %w", index, err)
	}
	m.stats.Batches++
	m.stats.Records += uint64(n)
	m.stats.MaxBatch = max(m.stats.MaxBatch, n)
	m.observeBatch(n)
	for _, s := range touched {
		if s.vs.vm.Ended {
			m.mu.Lock()
			delete(m.vms, s.vs.id)
			m.mu.Unlock()
		}
	}
	return acks, nil
}

// markDurable tells the submissions of a batch that it is in the store.
func markDurable(items []*item) {
	for _, it := range items {
		if it.ticket != nil {
			close(it.ticket.durable)
		}
	}
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
	for _, it := range rest {
		if it.kind == record.KindTeardown {
			it.vm.ending = false
		}
	}
	for _, it := range batch {
		if it.kind == record.KindTeardown && !it.vm.vm.Ended {
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
	m.mu.Lock()
	m.fault = nil
	m.mu.Unlock()
	m.log.Info("multiplexer recovered: log and PCR in step")
}

func (m *Mux) healLocked(ctx context.Context) error {
	vals, err := m.tpm.ReadPCRs(ctx, []int{m.cfg.PCR})
	if err != nil {
		return fmt.Errorf("read pcr %d: %w", m.cfg.PCR, err)
	}
	switch vals[0] {
	case m.pcrValue:
		return nil
	case m.pcrPrev:
		info := logstore.EpochInfo{Number: m.epoch}
		rp, err := m.replay(info, m.epochInfo.StartValue)
		if err != nil {
			return err
		}
		if rp.value != m.pcrValue {
			return fmt.Errorf("store replays to %x, expected %x", rp.value[:8], m.pcrValue[:8])
		}
		return m.extend(ctx, rp.lastV)
	default:
		err := &ReplayError{PCR: m.cfg.PCR, Got: vals[0], Want: m.pcrValue, Epoch: m.epoch, Batches: m.nextBatch}
		m.mu.Lock()
		m.fault = err
		m.mu.Unlock()
		return err
	}
}
