package mux

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Evidence quotes the log for VM id with the verifier's nonce (extraData
// H("tpmmux/v1/nonce" || nonce || id)) and returns the evidence: the quote,
// the quoted PCR values, the public log of every batch up to the one the
// quote covers, and the VM's records up to that batch. The quote is taken
// between batches, under the commit lock, so the log replays exactly to it.
func (m *Mux) Evidence(ctx context.Context, id conceal.Digest, nonce []byte) (*evidence.Evidence, error) {
	return m.EvidenceSince(ctx, id, nonce, nil)
}

// EvidenceSince is Evidence for a verifier that holds a checkpoint: only the
// batches after since.Batch and the VM's records from since.Records on are
// included. A nil since gives full evidence. The build counts against the
// evidence budget only while EvidenceSince runs: a caller that serializes
// or sends the result should use WithEvidence, which holds it until done.
func (m *Mux) EvidenceSince(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since) (*evidence.Evidence, error) {
	var out *evidence.Evidence
	err := m.WithEvidence(ctx, id, nonce, since, func(ev *evidence.Evidence) error {
		out = ev
		return nil
	})
	return out, err
}

// DefaultEvidenceBudget bounds the public log, in bytes of entries, that
// evidence builds in progress may hold at once. A build of a log larger
// than the budget takes all of it, so at most one such build (with its
// serialized copy) is in memory at a time, however many verifiers ask;
// small and incremental builds run side by side. Requests wait, in order,
// after their quote, so a waiting request's quote is already taken and its
// evidence still replays exactly to it.
const DefaultEvidenceBudget = 64 << 20

// SetEvidenceBudget sets the evidence budget in bytes of public log (0:
// DefaultEvidenceBudget). It takes effect only before the first evidence
// request; the benchmarks and the memory test use it to compare against an
// unbounded budget.
func (m *Mux) SetEvidenceBudget(n int64) { m.evLimit = n }

func (m *Mux) evBudget() (*semaphore.Weighted, int64) {
	m.evOnce.Do(func() {
		if m.evLimit <= 0 {
			m.evLimit = DefaultEvidenceBudget
		}
		m.evSem = semaphore.NewWeighted(m.evLimit)
	})
	return m.evSem, m.evLimit
}

// WithEvidence is EvidenceSince that calls fn with the evidence while the
// build still holds its share of the evidence budget, so that fn's
// serialized copy (a frame, a file) is bounded by the budget too; ev must
// not be used after fn returns.
func (m *Mux) WithEvidence(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since, fn func(ev *evidence.Evidence) error) error {
	res, err := m.evidenceQuote(ctx, id, nonce, since, nil)
	if err != nil {
		return err
	}
	sem, limit := m.evBudget()
	w := min(max(m.evidenceWeight(res, since)+2*m.chainWeight(id), 1), limit)
	if err := sem.Acquire(ctx, w); err != nil {
		return fmt.Errorf("evidence: wait for the evidence budget: %w", err)
	}
	defer sem.Release(w)
	ev, err := m.build(evidence.KindQuote, id, res.epoch, res.last, res.q, m.sel, res.vals, since)
	if err != nil {
		return err
	}
	ev.Batched = res.batched
	return fn(ev)
}

// evidenceWeight estimates the bytes of public log a build will copy: the
// entries from the first batch it includes to the quoted end of the log.
// A migrated VM's earlier segments are not counted: see chainWeight.
func (m *Mux) evidenceWeight(res quoteRes, since *evidence.Since) int64 {
	g0 := uint64(0)
	if since != nil {
		g0 = res.nextG
		m.store.View(func(sn *logstore.Snapshot) error {
			return sn.Batches(res.epoch, since.Batch+1, func(_ uint64, b *logstore.Batch) error {
				g0 = b.G0
				return errStop
			})
		})
	}
	if res.nextG <= g0 {
		return 0
	}
	return int64(res.nextG-g0) * int64(conceal.EntrySize)
}

// maxQuoteBatch bounds how many requests share one quote.
const maxQuoteBatch = 4096

type quoteReq struct {
	extra conceal.Digest
	leaf  conceal.Digest // MerkleLeaf(extra), hashed by the requester
	// wake is closed when the quote that answers the request, or a
	// reshuffle of the queue, is done; ans and index are set when the
	// loop takes the request for a quote (all guarded by qmu).
	wake  chan struct{}
	ans   *quoteAnswer
	index int
	// fixed is closed, before wake, when the quote that answers the
	// request has fixed the batch it covers (quoteAnswer.fix); it moves
	// with wake.
	fixed chan struct{}
}

// quoteAnswer is one quote's answer to every request it served, complete
// when their wake channel is closed: closing one channel wakes a thousand
// requesters in one step, where a send to each kept the last of them
// waiting behind the others (and the loop, preempted, behind them).
type quoteAnswer struct {
	res quoteRes // without index: each request's is its own
	// fix is res as far as it is known once the batch the quote covers
	// is fixed, before the TPM quotes: the epoch, the quoted batch, the
	// log's length, the share and the tree (no quote, no PCR values). It
	// is set before the requests' fixed channel closes.
	fix quoteRes
}

type quoteRes struct {
	q           tpm.Quote
	vals        []conceal.Digest
	epoch, last uint64
	nextG       uint64 // the log's length at the quote
	batched     *evidence.QuoteProof
	err         error
	share       *quoteShare // what the requests this quote answers share

	// A shared quote's tree and this request's leaf in it, as the quote
	// loop hands them over; quoteFor reads the audit path out of the tree
	// in the requester's goroutine, so that the loop's answers to a
	// thousand requesters do not wait for a thousand paths to be built
	// one after the other.
	tree         *conceal.MerkleTree
	index, count int
}

// quoteFor gets a quote covering extra. Requests that arrive while a quote
// is being taken wait for the next one and share it: its extraData is the
// root of a Merkle tree over their values, and each gets its audit path
// (docs/protocol.md, Batched quotes). A lone request gets a plain quote over its own value.
//
// With early, quoteFor calls it once the quote that answers the request
// has fixed the batch it covers and before the TPM quotes (a shared
// quote's 200 ms on hardware), with that part of the answer (no quote, no
// PCR values; quoteAnswer.fix): the requester can send what depends on the
// log alone meanwhile. An error from early is quoteFor's answer. early is
// not called without batching, or when the quote fails before the batch
// is fixed.
func (m *Mux) quoteFor(ctx context.Context, extra conceal.Digest, early func(quoteRes) error) quoteRes {
	if m.cfg.NoQuoteBatching {
		m.commitMu.Lock()
		q, vals, err := m.quoteLocked(ctx, extra[:], nil)
		epoch, last, nextG := m.epoch, m.nextBatch-1, m.nextG
		m.commitMu.Unlock()
		return quoteRes{q: q, vals: vals, epoch: epoch, last: last, nextG: nextG, err: err, share: new(quoteShare)}
	}
	// The leaf is hashed here, while the quote before is still being
	// taken, not by the loop between the quotes.
	req := &quoteReq{extra: extra, leaf: conceal.MerkleLeaf(extra)}
	m.qmu.Lock()
	if m.qwake == nil {
		m.qwake, m.qfixed = make(chan struct{}), make(chan struct{})
	}
	req.wake, req.fixed = m.qwake, m.qfixed
	m.qpending = append(m.qpending, req)
	if m.qtarget > 0 && len(m.qpending) >= m.qtarget {
		select {
		case m.qgather <- struct{}{}:
		default:
		}
	}
	if !m.quoting {
		m.quoting = true
		go m.quoteLoop()
	}
	wake, fixed := req.wake, req.fixed
	m.qmu.Unlock()
	if early == nil {
		fixed = nil
	}
	var batched *evidence.QuoteProof // the audit path, once read out
	for {
		select {
		case <-wake:
		case <-fixed:
			m.qmu.Lock()
			ans, index, cur := req.ans, req.index, req.fixed
			m.qmu.Unlock()
			if cur != fixed {
				fixed = cur // moved to a later quote (see below)
				continue
			}
			fixed = nil
			if ans == nil || ans.fix.share == nil {
				continue // the quote failed first: its answer comes with wake
			}
			r := ans.fix
			r.index = index
			batched = auditPath(&r)
			r.batched = batched
			if err := early(r); err != nil {
				return quoteRes{err: err}
			}
			continue
		case <-ctx.Done():
			return quoteRes{err: ctx.Err()}
		}
		m.qmu.Lock()
		ans, index, cur, curFixed := req.ans, req.index, req.wake, req.fixed
		m.qmu.Unlock()
		if cur != wake {
			// Moved to a later quote's channel while the one before was
			// taken (a queue beyond maxQuoteBatch). It may be taken by
			// that later quote already, whose answer is complete only
			// when that channel closes: wait for it.
			wake = cur
			if fixed != nil {
				fixed = curFixed
			}
			continue
		}
		if ans == nil {
			return quoteRes{err: errors.New("quote loop: a request's channel closed without an answer")}
		}
		r := ans.res
		r.index = index
		if batched != nil {
			r.batched, r.tree = batched, nil
		} else {
			r.batched = auditPath(&r)
		}
		return r
	}
}

// auditPath reads request r.index's audit path out of a shared quote's
// tree (nil for a quote of one request), and drops r's reference to the
// tree.
func auditPath(r *quoteRes) *evidence.QuoteProof {
	if r.count <= 1 || r.tree == nil {
		return nil
	}
	path := r.tree.Path(r.index)
	b := &evidence.QuoteProof{Index: uint64(r.index), Count: uint64(r.count), Path: make([]evidence.Hex, len(path))}
	flat := make([]byte, 0, len(path)*len(conceal.Digest{}))
	for i, p := range path {
		flat = append(flat, p[:]...)
		b.Path[i] = flat[len(flat)-len(p) : len(flat) : len(flat)]
	}
	r.tree = nil
	return b
}

// quoteLoop takes quotes until no request is waiting. After a quote that
// served several requests the loop gathers (gather) for up to half of that
// quote's time (at most maxQuoteLinger) until the requesters it served have
// asked again, or stopped coming: they then share the next quote, instead
// of the first of them taking it nearly alone and the rest waiting a whole
// extra quote (on a 200 ms TPM, closed-loop verifiers otherwise split into
// cohorts and get a fraction of the quotes). A request that finds no loop
// running starts one at once, so an idle TPM is never waited for.
func (m *Mux) quoteLoop() {
	var linger time.Duration
	target := 0
	for {
		var waited time.Duration
		awaited := 0
		if linger > 0 {
			start := time.Now()
			m.gather(target, linger)
			waited, awaited, linger = time.Since(start), target, 0
		}
		m.qmu.Lock()
		n := min(len(m.qpending), maxQuoteBatch)
		if n == 0 {
			m.quoting = false
			m.qmu.Unlock()
			return
		}
		reqs := m.qpending[:n:n]
		m.qpending = m.qpending[n:]
		ans := new(quoteAnswer)
		wake, fixed := m.qwake, m.qfixed
		for i, r := range reqs {
			r.ans, r.index = ans, i
		}
		// Requests that arrive from now on wait for a later quote, on
		// another channel; so do those beyond maxQuoteBatch (woken by this
		// quote's close, they find no answer and wait on theirs).
		m.qwake, m.qfixed = nil, nil
		if len(m.qpending) > 0 {
			m.qwake, m.qfixed = make(chan struct{}), make(chan struct{})
			for _, r := range m.qpending {
				r.wake, r.fixed = m.qwake, m.qfixed
			}
		}
		m.qmu.Unlock()
		m.observeQuoteBatch(n, awaited, waited)
		extra := reqs[0].extra
		var tree *conceal.MerkleTree
		if n > 1 {
			leaves := make([]conceal.Digest, n)
			for i, r := range reqs {
				leaves[i] = r.leaf
			}
			tree = conceal.NewMerkleTree(leaves)
			extra = tree.Root()
		}
		ctx, cancel := context.WithTimeout(context.Background(), quoteTimeout)
		start := time.Now()
		share := new(quoteShare)
		fixedClosed := false
		m.commitMu.Lock()
		q, vals, err := m.quoteLocked(ctx, extra[:], func() {
			// Under commitMu, after the applier's wait: the batch the
			// quote covers, and the store up to it, stay as they are.
			ans.fix = quoteRes{epoch: m.epoch, last: m.nextBatch - 1, nextG: m.nextG, share: share}
			if n > 1 {
				ans.fix.tree, ans.fix.count = tree, n
			}
			close(fixed)
			fixedClosed = true
		})
		epoch, last, nextG := m.epoch, m.nextBatch-1, m.nextG
		m.commitMu.Unlock()
		cancel()
		if !fixedClosed {
			close(fixed)
		}
		if n > 1 && err == nil {
			linger = min(time.Since(start)/2, maxQuoteLinger)
			// The requests that queued during the quote are other
			// requesters than the n it served (which have no answer yet):
			// the next quote waits for both (gather). Counted after the
			// answers go out, the served ones that are already back would
			// be counted twice, and the gather would wait for requesters
			// that do not exist.
			m.qmu.Lock()
			target = n + len(m.qpending)
			m.qmu.Unlock()
		}
		ans.res = quoteRes{q: q, vals: vals, epoch: epoch, last: last, nextG: nextG, err: err, share: share}
		if n > 1 && err == nil {
			ans.res.tree, ans.res.count = tree, n
		}
		close(wake)
	}
}

// maxQuoteLinger bounds how long the quote loop waits for requesters to
// come back after a shared quote (see quoteLoop and gather).
const maxQuoteLinger = 100 * time.Millisecond

// gather is the quote loop's pause after a quote that served several
// requests: the next quote can only include a requester that has asked
// again, and in a closed loop they all ask again within the time it takes
// to build and send their evidence. It waits until target requests are
// waiting (the ones the last quote served and those that queued during it,
// so that cohorts merge), or until none has arrived for gap (the rest are
// not coming soon), or at most linger. An idle TPM is never waited for:
// without requests the loop has ended.
func (m *Mux) gather(target int, linger time.Duration) {
	gap := min(linger/5, 10*time.Millisecond)
	start := time.Now()
	last, lastN := start, -1
	target = min(target, maxQuoteBatch)
	m.qmu.Lock()
	if m.qgather == nil {
		m.qgather = make(chan struct{}, 1)
	}
	m.qtarget = target
	m.qmu.Unlock()
	defer func() {
		m.qmu.Lock()
		m.qtarget = 0
		m.qmu.Unlock()
		select {
		case <-m.qgather:
		default:
		}
	}()
	tick := time.NewTimer(0)
	defer tick.Stop()
	for {
		m.qmu.Lock()
		waiting := len(m.qpending)
		m.qmu.Unlock()
		now := time.Now()
		if waiting >= target || now.Sub(start) >= linger {
			return
		}
		if waiting != lastN {
			last, lastN = now, waiting
		} else if waiting > 0 && now.Sub(last) >= gap {
			return
		}
		// The request that completes the target says so at once; the
		// timer only watches the gap and the linger.
		tick.Reset(250 * time.Microsecond)
		select {
		case <-m.qgather:
		case <-tick.C:
		}
	}
}

// quoteTimeout bounds one quote; a hardware quote takes well under a second.
const quoteTimeout = 2 * time.Minute

// FinalEvidence returns the post-mortem evidence of an ended VM: the quote
// the bridge kept when the teardown was extended, with the log up to it. It
// stays verifiable after the PCR has been reset.
func (m *Mux) FinalEvidence(id conceal.Digest) (*evidence.Evidence, error) {
	fq, sel, vals, err := m.finalQuote(id)
	if err != nil {
		return nil, err
	}
	return m.build(evidence.KindFinal, id, fq.Epoch, fq.Batch, tpm.Quote{Attest: fq.Attest, Signature: fq.Signature}, sel, vals, nil)
}

// finalQuote reads the quote kept at VM id's teardown, with its PCR
// selection and values as a fresh quote gives them.
func (m *Mux) finalQuote(id conceal.Digest) (*logstore.FinalQuote, []int, []conceal.Digest, error) {
	var fq *logstore.FinalQuote
	err := m.store.View(func(sn *logstore.Snapshot) error {
		var err error
		fq, err = sn.Final(id)
		return err
	})
	if err != nil {
		return nil, nil, nil, fmt.Errorf("final evidence: %w", err)
	}
	sel := make([]int, len(fq.PCRs))
	vals := make([]conceal.Digest, len(fq.Values))
	for i := range fq.PCRs {
		sel[i] = int(fq.PCRs[i])
		copy(vals[i][:], fq.Values[i])
	}
	return fq, sel, vals, nil
}

// quoteLocked reads the quoted PCRs and quotes them, retrying when a host
// PCR changed in between (host IMA extends PCR 10 at any time). It runs
// under commitMu, so PCR p cannot change.
//
// fixed, when not nil, is called once the batch the quote covers is fixed
// (the applier's wait is over and the mux is not faulted), before the TPM
// is asked: the store then holds every batch up to it.
func (m *Mux) quoteLocked(ctx context.Context, extra []byte, fixed func()) (tpm.Quote, []conceal.Digest, error) {
	start := time.Now()
	defer func() {
		d := time.Since(start)
		m.smu.Lock()
		m.stats.Quotes++
		m.stats.QuoteNanos += uint64(d)
		m.smu.Unlock()
		m.observeQuote(d)
	}()
	// The newest batch's extend may still run: the quote covers it.
	if err := m.waitExtendedLocked(); err != nil {
		return tpm.Quote{}, nil, err
	}
	if fixed != nil {
		m.mu.Lock()
		faulted := m.fault != nil
		m.mu.Unlock()
		if !faulted {
			fixed()
		}
	}
	for try := 0; try < 5; try++ {
		vals, err := m.tpm.ReadPCRs(ctx, m.sel)
		if err != nil {
			return tpm.Quote{}, nil, fmt.Errorf("read pcrs: %w", err)
		}
		if vals[indexOf(m.sel, m.cfg.PCR)] != m.pcrValue {
			err := &ReplayError{PCR: m.cfg.PCR, Got: vals[indexOf(m.sel, m.cfg.PCR)], Want: m.pcrValue, Epoch: m.epoch, Batches: m.nextBatch}
			m.setFault(err)
			return tpm.Quote{}, nil, err
		}
		q, err := m.tpm.Quote(ctx, m.sel, extra)
		if err != nil {
			return tpm.Quote{}, nil, fmt.Errorf("quote: %w", err)
		}
		info, err := quote.Check(q.Attest, q.Signature, m.tpm.AK())
		if err != nil {
			return tpm.Quote{}, nil, fmt.Errorf("check own quote: %w", err)
		}
		if er := m.epochInfo; info.ResetCount != er.ResetCount || info.RestartCount != er.RestartCount {
			err := &ReplayError{PCR: m.cfg.PCR, Epoch: m.epoch, Batches: m.nextBatch, Detail: fmt.Sprintf(
				"the TPM left the epoch's power cycle (resetCount %d -> %d, restartCount %d -> %d: a suspend/resume or hibernation); a TPM Restart can reset PCRs, so this epoch's history cannot be quoted any more: restart tpmmux-bridge to open a new epoch",
				er.ResetCount, info.ResetCount, er.RestartCount, info.RestartCount)}
			m.setFault(err)
			return tpm.Quote{}, nil, err
		}
		if bytes.Equal(info.PCRDigest, quote.PCRDigest(vals)) {
			return q, vals, nil
		}
	}
	return tpm.Quote{}, nil, fmt.Errorf("quoted PCRs kept changing between read and quote")
}

func indexOf(sel []int, p int) int {
	for i, v := range sel {
		if v == p {
			return i
		}
	}
	return -1
}

// build assembles evidence from the store: the batches [0, last] of epoch
// and VM id's records that sit in them.
func (m *Mux) build(kind string, id conceal.Digest, epoch, last uint64, q tpm.Quote, sel []int, vals []conceal.Digest, since *evidence.Since) (*evidence.Evidence, error) {
	return m.buildParts(kind, id, epoch, last, q, sel, vals, since, true)
}

// buildParts is build; without withLog the evidence's Log is left empty.
func (m *Mux) buildParts(kind string, id conceal.Digest, epoch, last uint64, q tpm.Quote, sel []int, vals []conceal.Digest, since *evidence.Since, withLog bool) (*evidence.Evidence, error) {
	ev := &evidence.Evidence{
		Version: evidence.Version,
		Kind:    kind,
		PCR:     uint32(m.cfg.PCR),
		Quote:   evidence.Quote{Attest: q.Attest, Signature: q.Signature},
		Host:    m.cfg.Host,
	}
	for i, p := range sel {
		ev.PCRValues = append(ev.PCRValues, evidence.PCRValue{Index: uint32(p), SHA256: append([]byte(nil), vals[i][:]...)})
	}
	if der, _ := m.akEncoded(); der != nil {
		ev.AK = append([]byte(nil), der...)
	}
	err := m.store.View(func(sn *logstore.Snapshot) error {
		if _, err := readVMPart(sn, id, epoch, last, since, &ev.VM, &ev.Previous, &ev.Records); err != nil {
			return err
		}
		ei, err := sn.Epoch(epoch)
		if err != nil {
			return err
		}
		ev.Epoch = evidence.Epoch{Number: epoch, Record: ei.Record}
		fromBatch := uint64(0)
		if since != nil {
			ev.From, fromBatch = since, since.Batch+1
		}
		err = sn.Batches(epoch, fromBatch, func(index uint64, b *logstore.Batch) error {
			if index > last || !withLog {
				return errStop
			}
			ev.Log = append(ev.Log, evidence.LogBatch{G0: b.G0, Entries: append([]byte(nil), b.Entries...)})
			return nil
		})
		if err != nil && err != errStop {
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("build evidence: %w", err)
	}
	return ev, nil
}

// readVMPart reads, in snapshot sn, VM id's own part of its evidence into
// vm, prev and recs: the VM, its earlier segments (live migration) and its
// records from the checkpoint (or its first) up to batch last. It refuses
// a VM of another epoch than the quoted one. It returns the VM as stored.
func readVMPart(sn *logstore.Snapshot, id conceal.Digest, epoch, last uint64, since *evidence.Since, vm *evidence.VM, prev *[]evidence.Evidence, recs *[]evidence.Record) (*logstore.VM, error) {
	v, err := sn.VM(id)
	if err != nil {
		return nil, err
	}
	if v.Epoch != epoch {
		return nil, fmt.Errorf("vm %s belongs to epoch %d, not %d", v.Name, v.Epoch, epoch)
	}
	*vm = evidence.VM{UUID: conceal.FormatUUID(v.UUID), Instance: append([]byte(nil), v.Instance[:]...), Name: v.Name}
	fromSeq := v.FirstSeq
	if since != nil {
		fromSeq = max(since.Records, v.FirstSeq)
	}
	if *prev, err = evidence.DecodeChain(v.Chain); err != nil {
		return nil, err
	}
	err = sn.Records(id, fromSeq, func(r *logstore.Record) error {
		if r.Batch > last {
			return errStop
		}
		*recs = append(*recs, evidence.Record{G: r.G, R: append([]byte(nil), r.R...)})
		return nil
	})
	if err != nil && err != errStop {
		return nil, err
	}
	return v, nil
}

// chainWeight is the size of VM id's earlier segments (live migration),
// which every evidence of it carries as Previous: decoded, and encoded
// again, on top of the log.
func (m *Mux) chainWeight(id conceal.Digest) int64 {
	var n int64
	m.store.View(func(sn *logstore.Snapshot) error {
		if vm, err := sn.VM(id); err == nil {
			n = int64(len(vm.Chain))
		}
		return nil
	})
	return n
}

type stopErr struct{}

func (stopErr) Error() string { return "stop" }

var errStop error = stopErr{}

// encodeBatches appends the evidence encoding of batches from, …, last of
// epoch to *buf, reading them a window of about chunk bytes at a time, each
// window in its own short read transaction, and calls flush after each.
func (m *Mux) encodeBatches(ctx context.Context, epoch, from, last uint64, chunk int, buf *[]byte, flush func() error) error {
	var seen uint64
	for next := from; next <= last; {
		if err := ctx.Err(); err != nil {
			return err
		}
		err := m.store.View(func(sn *logstore.Snapshot) error {
			size := 0
			err := sn.Batches(epoch, next, func(index uint64, b *logstore.Batch) error {
				if index > last || size >= chunk {
					return errStop
				}
				if index != next {
					return fmt.Errorf("batch %d missing from the store (found %d)", next, index)
				}
				p := *buf
				p = canon.AppendHead(p, 5, 2) // map {1: g0, 2: entries}
				p = canon.AppendHead(p, 0, 1)
				p = canon.AppendHead(p, 0, b.G0)
				p = canon.AppendHead(p, 0, 2)
				if len(b.Entries) == 0 {
					// build copies no entries into a nil slice, which the
					// encoder writes as null: do as it does.
					p = append(p, 0xf6)
				} else {
					p = canon.AppendHead(p, 2, uint64(len(b.Entries)))
					p = append(p, b.Entries...)
				}
				*buf = p
				size += len(b.Entries)
				next++
				seen++
				return nil
			})
			if err == errStop {
				err = nil
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("stream evidence: %w", err)
		}
		if err := flush(); err != nil {
			return err
		}
		if seen == 0 {
			return fmt.Errorf("stream evidence: batch %d missing from the store", next)
		}
	}
	if n := last + 1 - from; seen != n {
		return fmt.Errorf("stream evidence: %d batches, want %d", seen, n)
	}
	return nil
}

var evEnc = canon.Enc()

// evidenceQuote checks an evidence request (the nonce, the mux not
// faulted, a checkpoint inside the log) and gets the quote that answers it.
// early, when not nil, is called as quoteFor calls it, once the
// checkpoint is checked against the batch the quote covers.
func (m *Mux) evidenceQuote(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since, early func(quoteRes) error) (quoteRes, error) {
	if len(nonce) == 0 || len(nonce) > 64 {
		return quoteRes{}, fmt.Errorf("evidence: nonce of %d bytes, want 1 to 64", len(nonce))
	}
	m.mu.Lock()
	fault := m.fault
	m.mu.Unlock()
	if fault != nil {
		return quoteRes{}, fmt.Errorf("not serving evidence: %w", fault)
	}
	// A VM asked about right after its start: its genesis may be held
	// for the slot, which batches it.
	m.awaitGenesis(ctx, id)
	var onFixed func(quoteRes) error
	if early != nil {
		onFixed = func(r quoteRes) error {
			if checkSince(since, r.last) != nil {
				return nil // refused with the answer
			}
			return early(r)
		}
	}
	res := m.quoteFor(ctx, conceal.NonceData(nonce, id), onFixed)
	if res.err != nil {
		return quoteRes{}, fmt.Errorf("evidence: %w", res.err)
	}
	if err := checkSince(since, res.last); err != nil {
		return quoteRes{}, err
	}
	return res, nil
}

// checkSince refuses a checkpoint beyond the quoted batch last.
func checkSince(since *evidence.Since, last uint64) error {
	if since != nil && since.Batch >= last+1 {
		return fmt.Errorf("evidence: checkpoint batch %d is beyond the log's last batch %d (another epoch?)", since.Batch, last)
	}
	return nil
}
