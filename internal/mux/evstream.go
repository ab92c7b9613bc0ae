package mux

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/crc32c"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Streamed evidence is the canonical CBOR map of evidence.Evidence written
// in three runs, so that what the requests of one quote share is encoded
// once and each request builds only its own bytes:
//
//   - the map's head and the fields before the log (keys 1-7: the quote,
//     its PCR values, the AK, the epoch), the same for every request a
//     quote answers (quoteShare), then key 8 and the log array's head;
//   - the public log segment (the batches the request's checkpoint does not
//     hold, up to the quoted one), shared by every request with the same
//     checkpoint and quoted batch (logCache), with its CRC-32C;
//   - the fields after the log (keys 9-14: the VM, its records, the
//     request's own audit path, the host, the checkpoint, the VM's earlier
//     segments), read in one store transaction and encoded once per quote,
//     VM and checkpoint (vmPart); only the audit path is the request's own.

// evHead is Evidence's fields before the log, with its keys and types.
type evHead struct {
	Version   uint32              `cbor:"1,keyasint"`
	Kind      string              `cbor:"2,keyasint"`
	PCR       uint32              `cbor:"3,keyasint"`
	Quote     evidence.Quote      `cbor:"4,keyasint"`
	PCRValues []evidence.PCRValue `cbor:"5,keyasint"`
	AK        evidence.Hex        `cbor:"6,keyasint,omitempty"`
	Epoch     evidence.Epoch      `cbor:"7,keyasint"`
}

// evTail is Evidence's fields after the log, with its keys and types.
type evTail struct {
	VM       evidence.VM          `cbor:"9,keyasint"`
	Records  []evidence.Record    `cbor:"10,keyasint"`
	Batched  *evidence.QuoteProof `cbor:"11,keyasint,omitempty"`
	Host     string               `cbor:"12,keyasint,omitempty"`
	From     *evidence.Since      `cbor:"13,keyasint,omitempty"`
	Previous []evidence.Evidence  `cbor:"14,keyasint,omitempty"`
}

// evVM is evTail's fields before the audit path (Batched), which are the
// same for every request of one VM from one checkpoint that a quote
// answers.
type evVM struct {
	VM      evidence.VM       `cbor:"9,keyasint"`
	Records []evidence.Record `cbor:"10,keyasint"`
}

// evAfter is evTail's fields after the audit path.
type evAfter struct {
	Host     string              `cbor:"12,keyasint,omitempty"`
	From     *evidence.Since     `cbor:"13,keyasint,omitempty"`
	Previous []evidence.Evidence `cbor:"14,keyasint,omitempty"`
}

// batchedKey is Evidence's key of the audit path.
const batchedKey = 11

// appendProof appends the audit path p as Evidence's field 11, as the
// canonical encoder writes it.
func appendProof(b []byte, p *evidence.QuoteProof) []byte {
	b = canon.AppendHead(b, 0, batchedKey)
	b = canon.AppendHead(b, 5, 3) // map {1: index, 2: count, 3: path}
	b = canon.AppendHead(b, 0, 1)
	b = canon.AppendHead(b, 0, p.Index)
	b = canon.AppendHead(b, 0, 2)
	b = canon.AppendHead(b, 0, p.Count)
	b = canon.AppendHead(b, 0, 3)
	if p.Path == nil {
		return append(b, 0xf6)
	}
	b = canon.AppendHead(b, 4, uint64(len(p.Path)))
	for _, h := range p.Path {
		if h == nil {
			b = append(b, 0xf6)
			continue
		}
		b = canon.AppendHead(b, 2, uint64(len(h)))
		b = append(b, h...)
	}
	return b
}

// logKey is Evidence's key of the log.
const logKey = 8

// encodeFields encodes v (evHead or evTail) and returns its fields without
// the map's head, and how many there are.
func encodeFields(v any) ([]byte, int, error) {
	b, err := evEnc.Marshal(v)
	if err != nil {
		return nil, 0, fmt.Errorf("encode evidence: %w", err)
	}
	if len(b) == 0 || b[0]>>5 != 5 || b[0]&0x1f >= 24 {
		return nil, 0, errors.New("encode evidence: unexpected map head")
	}
	return b[1:], int(b[0] & 0x1f), nil
}

func headOf(ev *evidence.Evidence) evHead {
	return evHead{Version: ev.Version, Kind: ev.Kind, PCR: ev.PCR, Quote: ev.Quote, PCRValues: ev.PCRValues, AK: ev.AK, Epoch: ev.Epoch}
}

func tailOf(ev *evidence.Evidence) evTail {
	return evTail{VM: ev.VM, Records: ev.Records, Batched: ev.Batched, Host: ev.Host, From: ev.From, Previous: ev.Previous}
}

// quoteShare is what the requests one quote answers share: the encoding of
// the evidence's fields before the log, which depend on the quote alone,
// and of each VM's fields for each checkpoint (vmPart), each made once by
// the first request that needs it. It lives as long as the requests of its
// quote: a later quote has a share of its own.
type quoteShare struct {
	once sync.Once
	head []byte
	n    int
	err  error

	mu   sync.Mutex
	vms  map[vmPartKey]*vmPart
	pres map[[2]uint64][]byte
}

// pre returns the evidence's bytes before its log segment: the map's head
// (fields fields), the fields before the log, the log's key and the head of
// an array of n batches. The requests of a quote have one or two kinds.
func (s *quoteShare) pre(fields int, n uint64) []byte {
	k := [2]uint64{uint64(fields), n}
	s.mu.Lock()
	defer s.mu.Unlock()
	if b, ok := s.pres[k]; ok {
		return b
	}
	b := preBytes(s.head, fields, n)
	if s.pres == nil {
		s.pres = make(map[[2]uint64][]byte)
	}
	s.pres[k] = b
	return b
}

// preBytes is the evidence's bytes before its log of n batches: the map's
// head (fields fields), head (the fields before the log) and the log's
// key and array head.
func preBytes(head []byte, fields int, n uint64) []byte {
	pre := make([]byte, 0, len(head)+16)
	pre = canon.AppendHead(pre, 5, uint64(fields))
	pre = append(pre, head...)
	pre = canon.AppendHead(pre, 0, logKey)
	return canon.AppendHead(pre, 4, n) // array of n batches
}

func (s *quoteShare) get(m *Mux, res quoteRes) ([]byte, int, error) {
	s.once.Do(func() { s.head, s.n, s.err = m.quoteHead(res) })
	return s.head, s.n, s.err
}

// vmPartKey names one VM's fields of evidence: the VM, the checkpoint the
// request is incremental from (none: full), and whether the identity is
// read too.
type vmPartKey struct {
	id             conceal.Digest
	incr           bool
	batch, records uint64
	ident          bool
}

// vmPart is a VM's fields of the evidence of one quote: the encoding of
// the fields before the audit path (pre, nPre of them) and after it
// (post, nPost), and the VM's identity.
type vmPart struct {
	once        sync.Once
	pre, post   []byte
	nPre, nPost int
	ident       *conceal.Identity
	err         error
}

// maxSharedVMPart bounds the VM fields a quote's share keeps for the other
// requests of the same VM and checkpoint; larger ones (a VM with very many
// records) are read by each request.
const maxSharedVMPart = 64 << 10

// vmPart returns VM id's fields of the evidence of res's quote from since,
// read and encoded once for all the requests of that VM and checkpoint
// that the quote answers. The key holds the VM and the checkpoint, and the
// share belongs to one quote (one quoted batch), so a request gets its own
// VM's records up to its own quote, never another's.
func (s *quoteShare) vmPart(m *Mux, id conceal.Digest, res quoteRes, since *evidence.Since, withIdentity bool) (*vmPart, error) {
	k := vmPartKey{id: id, ident: withIdentity}
	if since != nil {
		k.incr, k.batch, k.records = true, since.Batch, since.Records
	}
	s.mu.Lock()
	if s.vms == nil {
		s.vms = make(map[vmPartKey]*vmPart)
	}
	p := s.vms[k]
	if p == nil {
		p = new(vmPart)
		s.vms[k] = p
	}
	s.mu.Unlock()
	p.once.Do(func() { p.err = m.readVMPart(p, id, res, since, withIdentity) })
	if p.err != nil {
		// Not kept: the next request reads for itself.
		s.mu.Lock()
		if s.vms[k] == p {
			delete(s.vms, k)
		}
		s.mu.Unlock()
		return nil, p.err
	}
	if len(p.pre)+len(p.post) > maxSharedVMPart {
		s.mu.Lock()
		if s.vms[k] == p {
			delete(s.vms, k)
		}
		s.mu.Unlock()
	}
	return p, nil
}

// readVMPart reads and encodes VM id's fields into p.
func (m *Mux) readVMPart(p *vmPart, id conceal.Digest, res quoteRes, since *evidence.Since, withIdentity bool) error {
	t, ident, err := m.vmFields(id, res.epoch, res.last, since, withIdentity)
	if err != nil {
		return err
	}
	if p.pre, p.nPre, err = encodeFields(&evVM{VM: t.VM, Records: t.Records}); err != nil {
		return err
	}
	if p.post, p.nPost, err = encodeFields(&evAfter{Host: t.Host, From: t.From, Previous: t.Previous}); err != nil {
		return err
	}
	p.ident = ident
	return nil
}

// tail returns the fields after the log of one request's evidence, in
// runs: p's with the request's audit path between them, and how many
// fields there are.
func (p *vmPart) tail(batched *evidence.QuoteProof) ([][]byte, int) {
	if batched == nil {
		return [][]byte{p.pre, p.post}, p.nPre + p.nPost
	}
	proof := appendProof(make([]byte, 0, 16+len(batched.Path)*34), batched)
	return [][]byte{p.pre, proof, p.post}, p.nPre + 1 + p.nPost
}

// quoteHead encodes the fields before the log of evidence of res's quote.
func (m *Mux) quoteHead(res quoteRes) ([]byte, int, error) {
	h := evHead{
		Version: evidence.Version,
		Kind:    evidence.KindQuote,
		PCR:     uint32(m.cfg.PCR),
		Quote:   evidence.Quote{Attest: res.q.Attest, Signature: res.q.Signature},
	}
	for i, p := range m.sel {
		h.PCRValues = append(h.PCRValues, evidence.PCRValue{Index: uint32(p), SHA256: append([]byte(nil), res.vals[i][:]...)})
	}
	if der, _ := m.akEncoded(); der != nil {
		h.AK = der
	}
	err := m.store.View(func(sn *logstore.Snapshot) error {
		ei, err := sn.Epoch(res.epoch)
		if err != nil {
			return err
		}
		h.Epoch = evidence.Epoch{Number: res.epoch, Record: append([]byte(nil), ei.Record...)}
		return nil
	})
	if err != nil {
		return nil, 0, fmt.Errorf("build evidence: %w", err)
	}
	return encodeFields(&h)
}

// vmFields reads, in one store transaction, VM id's part of its evidence:
// the VM, its records from the checkpoint (or its first) up to batch last
// and its earlier segments; with withIdentity also its identity.
func (m *Mux) vmFields(id conceal.Digest, epoch, last uint64, since *evidence.Since, withIdentity bool) (*evTail, *conceal.Identity, error) {
	t := &evTail{Host: m.cfg.Host, From: since}
	var ident *conceal.Identity
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := readVMPart(sn, id, epoch, last, since, &t.VM, &t.Previous, &t.Records)
		if err != nil {
			return err
		}
		if withIdentity {
			k, err := m.unwrapKey(vm)
			if err != nil {
				return err
			}
			ident = &conceal.Identity{UUID: vm.UUID, Instance: vm.Instance, Key: k}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("build evidence: %w", err)
	}
	return t, ident, nil
}

// EvidencePart is one part of streamed evidence (StreamEvidenceParts): its
// bytes are the runs of Head, then Shared.Bytes, then the runs of Tail.
// Runs and Shared may be bytes other requests share: they must not be
// changed. Shared, when set, is the
// public log segment every request with the same checkpoint that a quote
// answers gets: the same bytes, not a copy, with their CRC-32C computed
// once, so that a transport that frames and checksums the part (the guest
// protocol, wire.EvidenceFrame) need not pass over them. Shared.Bytes must
// not be changed.
type EvidencePart struct {
	Head   [][]byte
	Shared crc32c.Shared
	Tail   [][]byte
	Last   bool // the evidence's last part
	// Early says the part holds the evidence's end and comes before the
	// rest (StreamEvidenceParts with early; wire.EvidenceResponse.Early):
	// the evidence is the later parts' bytes followed by the early ones.
	Early bool
	// Identity is the VM's identity, read with the evidence, on the first
	// part when it was asked for.
	Identity *conceal.Identity
}

// Len returns the part's size in bytes.
func (p *EvidencePart) Len() int { return runsLen(p.Head) + len(p.Shared.Bytes) + runsLen(p.Tail) }

func runsLen(runs [][]byte) int {
	n := 0
	for _, r := range runs {
		n += len(r)
	}
	return n
}

// StreamEvidence is WithEvidence for evidence of any size: it writes the
// evidence's canonical CBOR, byte for byte what MarshalBinary would give,
// to emit in pieces of at most about chunk bytes (the last call has last
// set), without ever holding the whole public log. The batches are read
// from the store a window at a time, each window in its own short read
// transaction, so a slow reader never holds the store. Only the VM's own
// records are held at once. Memory is O(chunk + the VM's records) however
// long the log is; the evidence budget is charged that much.
func (m *Mux) StreamEvidence(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since, chunk int, emit func(p []byte, last bool) error) error {
	return m.streamEvidence(ctx, id, nonce, since, chunk, false, false, true, func(p *EvidencePart) error {
		return emit(p.Head[0], p.Last)
	})
}

// StreamEvidenceParts is StreamEvidence for a transport that sends a part
// as it is (EvidencePart): evidence up to chunk bytes whose log segment is
// shared with other requests comes as one part that references the shared
// bytes, so a request costs its own bytes (the VM's fields, its audit
// path), not a copy of the log. With withIdentity the first part carries
// the VM's identity. emit must be done with a part when it returns.
//
// With early, everything after the quote's own fields (the log segment,
// the VM's fields, the audit path: what depends on the quoted batch
// alone) is emitted as soon as a shared quote has fixed its batch, in a
// part with Early set, while the TPM quotes; the quote's fields follow in
// the last part once the quote is taken. A transport then moves nearly all
// of the evidence's bytes during the quote instead of after it (docs/
// protocol.md, Early evidence). Evidence whose end does not fit one part
// of chunk bytes, and a quote of one request alone, are sent as without
// early.
func (m *Mux) StreamEvidenceParts(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since, chunk int, withIdentity, early bool, emit func(p *EvidencePart) error) error {
	return m.streamEvidence(ctx, id, nonce, since, chunk, withIdentity, early, false, emit)
}

// streamEvidence is StreamEvidence and StreamEvidenceParts; with concat
// every part is one run of bytes, Head[0] (and early is ignored).
func (m *Mux) streamEvidence(ctx context.Context, id conceal.Digest, nonce []byte, since *evidence.Since, chunk int, withIdentity, early, concat bool, emit func(p *EvidencePart) error) error {
	if chunk <= 0 {
		chunk = 4 << 20
	}
	var sent *quoteRes // what the early part was built from
	nSent := 0         // the number of fields it holds
	var onFixed func(quoteRes) error
	if early && !concat {
		onFixed = func(r quoteRes) error {
			n, ok, err := m.emitEarly(ctx, id, r, since, chunk, withIdentity, emit)
			if ok {
				sent, nSent = &r, n
			}
			return err
		}
	}
	res, err := m.evidenceQuote(ctx, id, nonce, since, onFixed)
	if err != nil {
		return err
	}
	_, nHead, err := res.share.get(m, res)
	if err != nil {
		return err
	}
	from := uint64(0)
	if since != nil {
		from = since.Batch + 1
	}
	if sent != nil {
		if sent.epoch != res.epoch || sent.last != res.last || sent.share != res.share {
			return fmt.Errorf("evidence: the quote covers epoch %d batch %d, its early part epoch %d batch %d", res.epoch, res.last, sent.epoch, sent.last)
		}
		// The start: the quote's fields, the log's key and array head.
		pre := res.share.pre(nHead+1+nSent, res.last+1-from)
		return emit(&EvidencePart{Head: [][]byte{pre}, Last: true})
	}
	vp, err := res.share.vmPart(m, id, res, since, withIdentity)
	if err != nil {
		return err
	}
	tail, nTail := vp.tail(res.batched)
	pre := res.share.pre(nHead+1+nTail, res.last+1-from)
	return m.streamLog(ctx, pre, tail, res, since, chunk, vp.ident, concat, emit)
}

// emitEarly emits the end of the evidence of r's quote (its batch fixed,
// not yet taken) as one early part: the log segment from since, the VM's
// fields and the request's audit path. It returns how many evidence
// fields the part holds after the log, and ok false (nothing sent) when
// the quote answers this request alone, or the part would be larger than
// chunk: the evidence then goes after the quote as without early.
func (m *Mux) emitEarly(ctx context.Context, id conceal.Digest, r quoteRes, since *evidence.Since, chunk int, withIdentity bool, emit func(p *EvidencePart) error) (int, bool, error) {
	if r.batched == nil {
		// A lone request's quote is taken at once: nothing to overlap.
		return 0, false, nil
	}
	vp, err := r.share.vmPart(m, id, r, since, withIdentity)
	if err != nil {
		return 0, false, err
	}
	tail, nTail := vp.tail(r.batched)
	seg, err := m.logSegment(ctx, r, since)
	if err != nil {
		return 0, false, err
	}
	// Room for the start (the quote's fields, about 1 KiB) in the
	// transport's part size.
	const startRoom = 8 << 10
	if seg.big || len(seg.body)+runsLen(tail)+startRoom > chunk {
		return 0, false, nil
	}
	sem, limit := m.evBudget()
	w := min(int64(2*runsLen(tail)+64), limit)
	if err := sem.Acquire(ctx, w); err != nil {
		return 0, false, fmt.Errorf("evidence: wait for the evidence budget: %w", err)
	}
	defer sem.Release(w)
	return nTail, true, emit(&EvidencePart{Shared: seg.shared, Tail: tail, Early: true, Identity: vp.ident})
}

// logSegment returns the log segment of evidence of res's quote from
// since (the batches from the checkpoint's next, or 0, to res.last): from
// the cache, encoded and kept there unless it is big (logCache).
func (m *Mux) logSegment(ctx context.Context, res quoteRes, since *evidence.Since) (*logSeg, error) {
	from := uint64(0)
	if since != nil {
		from = since.Batch + 1
	}
	n := res.last + 1 - from
	return m.evCache.get(ctx, res.epoch, from, res.last, func() (*logSeg, error) {
		w := m.evidenceWeight(res, since) + int64(n)*16
		if w > maxCachedLog {
			return &logSeg{big: true}, nil
		}
		s := &logSeg{body: make([]byte, 0, w)}
		err := m.encodeBatches(ctx, res.epoch, from, res.last, maxCachedLog, &s.body, func() error { return nil })
		s.shared = crc32c.NewShared(s.body)
		return s, err
	})
}

// StreamFinalEvidence is FinalEvidence streamed like StreamEvidence: the
// post-mortem evidence of an ended VM, at any log size.
func (m *Mux) StreamFinalEvidence(ctx context.Context, id conceal.Digest, chunk int, emit func(p []byte, last bool) error) error {
	if chunk <= 0 {
		chunk = 4 << 20
	}
	fq, sel, vals, err := m.finalQuote(id)
	if err != nil {
		return err
	}
	shell, err := m.buildParts(evidence.KindFinal, id, fq.Epoch, fq.Batch, tpm.Quote{Attest: fq.Attest, Signature: fq.Signature}, sel, vals, nil, false)
	if err != nil {
		return err
	}
	res := quoteRes{epoch: fq.Epoch, last: fq.Batch}
	m.store.View(func(sn *logstore.Snapshot) error {
		return sn.Batches(fq.Epoch, fq.Batch, func(_ uint64, b *logstore.Batch) error {
			res.nextG = b.G0 + uint64(b.EntryCount())
			if b.G0 == 0 {
				res.nextG++ // the epoch record's leaf
			}
			return errStop
		})
	})
	h := headOf(shell)
	head, nHead, err := encodeFields(&h)
	if err != nil {
		return err
	}
	t := tailOf(shell)
	tail, nTail, err := encodeFields(&t)
	if err != nil {
		return err
	}
	pre := preBytes(head, nHead+1+nTail, res.last+1)
	return m.streamLog(ctx, pre, [][]byte{tail}, res, nil, chunk, nil, true, func(p *EvidencePart) error {
		return emit(p.Head[0], p.Last)
	})
}

// streamLog emits the evidence whose bytes before its log are pre
// (preBytes) and after it the runs of tail, with the batches of res.epoch
// from since (or 0) to res.last as its log.
func (m *Mux) streamLog(ctx context.Context, pre []byte, tail [][]byte, res quoteRes, since *evidence.Since, chunk int, ident *conceal.Identity, concat bool, emit func(p *EvidencePart) error) error {
	from := uint64(0)
	if since != nil {
		from = since.Batch + 1
	}
	n := res.last + 1 - from
	tailLen := runsLen(tail)
	seg, err := m.logSegment(ctx, res, since)
	if err != nil {
		return err
	}
	sem, limit := m.evBudget()
	if !seg.big && !concat && len(pre)+len(seg.body)+tailLen <= chunk {
		// The usual request: one part that references the shared segment.
		// It holds its own bytes (and a transport's frame of them).
		w := min(int64(2*(len(pre)+tailLen)+64), limit)
		if err := sem.Acquire(ctx, w); err != nil {
			return fmt.Errorf("evidence: wait for the evidence budget: %w", err)
		}
		defer sem.Release(w)
		return emit(&EvidencePart{Head: [][]byte{pre}, Shared: seg.shared, Tail: tail, Last: true, Identity: ident})
	}
	est := int64(len(pre)+tailLen) + int64(len(seg.body)) + 64
	if seg.big {
		est += m.evidenceWeight(res, since) + int64(n)*16
	}
	// A stream holds about two pieces (its buffer and the frame made of
	// it), a small evidence all of itself, twice.
	w := min(2*est, int64(2*chunk), limit)
	if err := sem.Acquire(ctx, w); err != nil {
		return fmt.Errorf("evidence: wait for the evidence budget: %w", err)
	}
	defer sem.Release(w)
	buf := make([]byte, 0, min(int64(chunk+chunk/4), est))
	buf = append(buf, pre...)
	first := true
	flush := func(force bool) error {
		for len(buf) >= chunk || (force && len(buf) > 0) {
			k := min(len(buf), chunk)
			last := force && k == len(buf)
			p := &EvidencePart{Head: [][]byte{buf[:k]}, Last: last}
			if first {
				p.Identity, first = ident, false
			}
			if err := emit(p); err != nil {
				return err
			}
			buf = append(buf[:0], buf[k:]...)
		}
		return nil
	}
	if !seg.big {
		for body := seg.body; len(body) > 0; {
			k := min(len(body), chunk)
			buf = append(buf, body[:k]...)
			body = body[k:]
			if err := flush(false); err != nil {
				return err
			}
		}
	} else if err := m.encodeBatches(ctx, res.epoch, from, res.last, chunk, &buf, func() error { return flush(false) }); err != nil {
		return err
	}
	for _, t := range tail {
		buf = append(buf, t...)
	}
	return flush(true)
}

// maxCachedLog bounds an encoded log segment the cache keeps for the
// requests that share it (larger ones are streamed window by window by
// each request); maxCacheBytes and maxCacheSegs bound the whole cache.
const (
	maxCachedLog  = 4 << 20
	maxCacheBytes = 2 * maxCachedLog
	maxCacheSegs  = 64
)

// logCache keeps recently encoded log segments: the batches from, …, last
// of an epoch, as they appear in evidence, with their CRC-32C. A batch
// never changes once committed, so a segment is valid for any request
// whose checkpoint and quoted batch are its from and last; a request whose
// quote covers a later batch asks for another segment. Requests that ask
// for a segment being encoded wait for it.
type logCache struct {
	mu    sync.Mutex
	segs  []*logSeg // oldest first
	bytes int
}

// logSeg is one segment of logCache.
type logSeg struct {
	epoch, from, last uint64
	done              chan struct{} // closed when built
	err               error
	body              []byte        // shared: callers must not change it
	shared            crc32c.Shared // body with its CRC-32C
	big               bool          // larger than maxCachedLog: not kept, each request streams it
	ready             bool          // built (guarded by logCache.mu)
}

// get returns the segment, encoding it with build when it is not kept.
func (c *logCache) get(ctx context.Context, epoch, from, last uint64, build func() (*logSeg, error)) (*logSeg, error) {
	for {
		c.mu.Lock()
		var s *logSeg
		for _, x := range c.segs {
			if x.epoch == epoch && x.from == from && x.last == last {
				s = x
				break
			}
		}
		if s != nil {
			c.mu.Unlock()
			select {
			case <-s.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if s.err == nil {
				return s, nil
			}
			// Its builder failed (and removed it): build it here.
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			continue
		}
		s = &logSeg{epoch: epoch, from: from, last: last, done: make(chan struct{})}
		c.segs = append(c.segs, s)
		c.mu.Unlock()
		b, err := build()
		c.mu.Lock()
		if err != nil {
			s.err = err
			c.remove(s)
		} else {
			s.body, s.shared, s.big, s.ready = b.body, b.shared, b.big, true
			c.bytes += len(s.body)
			c.evict(s)
		}
		c.mu.Unlock()
		close(s.done)
		if err != nil {
			return nil, err
		}
		return s, nil
	}
}

func (c *logCache) remove(s *logSeg) {
	for i, x := range c.segs {
		if x == s {
			c.segs = append(c.segs[:i], c.segs[i+1:]...)
			c.bytes -= len(x.body)
			return
		}
	}
}

// evict drops the oldest built segments other than keep until the cache
// is within its bounds.
func (c *logCache) evict(keep *logSeg) {
	for i := 0; i < len(c.segs) && (len(c.segs) > maxCacheSegs || c.bytes > maxCacheBytes); {
		x := c.segs[i]
		if x == keep || !x.ready {
			i++
			continue
		}
		c.segs = append(c.segs[:i], c.segs[i+1:]...)
		c.bytes -= len(x.body)
	}
}
