// Package verify is the tenant's verifier: given evidence for one VM, the
// verifier's nonce, the VM's identity (with its key K) and a trusted AK, it
// performs the six checks of DESIGN.md §4 and reports what it found. It is
// pure: it talks to no TPM, store or network, so a tenant can run it
// anywhere, and it shares conceal and evidence with the bridge.
package verify

import (
	"bytes"
	"crypto/ecdsa"
	"encoding/hex"
	"errors"
	"fmt"
	"math"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
)

// Options are the verifier's trust inputs. None of them comes from the
// evidence.
type Options struct {
	// Nonce is the fresh challenge the verifier sent; required unless
	// PostMortem.
	Nonce []byte
	// PostMortem accepts the bridge's final quote of an ended VM instead of
	// a fresh one: it proves the whole history up to teardown, not that the
	// evidence is new.
	PostMortem bool
	// Identity is the VM's concealment identity (uuid, instance, key).
	Identity *conceal.Identity
	// AK is the trusted attestation key of the host.
	AK *ecdsa.PublicKey
	// PCR, when non-zero, is the multiplexer PCR the verifier expects.
	PCR int
	// Appraise, when set, appraises each measurement record (step 5).
	Appraise func(m *record.Measurement) []Violation
	// Appraiser, when set, appraises the genesis record's launch
	// measurement and each measurement record with its number (step 5;
	// appraise.go).
	Appraiser Appraiser
	// BindKeys are hashes of public keys (KeyHash) that must be bound in
	// the VM's log by a binding record: the key of the peer the verifier
	// talks to, so that evidence relayed from another VM is rejected
	// (relay attack; appraise.go).
	BindKeys [][32]byte
	// Checkpoint, when set, is what an earlier verification of this VM
	// left (Report.Checkpoint): the evidence must then be the delta after
	// it, and only the delta is replayed and checked.
	Checkpoint *Checkpoint
}

// Checkpoint is what a verifier keeps after verifying a VM's evidence so
// that it can later verify only what came after: the log position and the
// PCR value there (trusted because a verified quote covered them), the VM's
// record count, the global index and content of its last record, and
// whether it had ended. Keep it with the identity: it is the verifier's
// state, never taken from evidence.
type Checkpoint struct {
	ID         []byte `json:"id"` // the VM instance it belongs to
	EpochHash  []byte `json:"epoch_sha256"`
	Batch      uint64 `json:"batch"`
	NextG      uint64 `json:"next_g"`
	PCR        []byte `json:"pcr"`
	Records    uint64 `json:"records"`
	LastG      uint64 `json:"last_g"`
	LastRecord []byte `json:"last_record"`
	Ended      bool   `json:"ended"`
	// Bindings are the keys bound in the VM's log so far, so that
	// Options.BindKeys holds across incremental verifications.
	Bindings []BoundKey `json:"bindings,omitempty"`
}

// Since returns what to ask the bridge for to get the delta after c.
func (c *Checkpoint) Since() *evidence.Since {
	return &evidence.Since{Batch: c.Batch, Records: c.Records}
}

// Rejection is why evidence was not trusted. Step names which of the six
// checks failed.
type Rejection struct {
	Step   int
	Reason string
}

func (r *Rejection) Error() string { return r.Reason }

func reject(step int, format string, args ...any) error {
	return &Rejection{Step: step, Reason: fmt.Sprintf(format, args...)}
}

// IsRejection reports whether err is a Rejection (as opposed to a usage or
// input error).
func IsRejection(err error) bool {
	var r *Rejection
	return errors.As(err, &r)
}

// Verify checks ev against opts. It returns the report and nil when the
// evidence is trusted; a report (as far as it got) and a *Rejection when
// not. Only fields authenticated by the quote, the replay or the VM's key
// are used for decisions (docs/evidence.md).
func Verify(ev *evidence.Evidence, opts Options) (*Report, error) {
	rep := &Report{Kind: ev.Kind}
	err := verify(ev, opts, rep)
	if err == nil {
		err = rep.checkBindings(opts.BindKeys)
	}
	if err != nil {
		var rj *Rejection
		if errors.As(err, &rj) {
			rep.Reason = rj.Reason
		}
		return rep, err
	}
	rep.Trusted = len(rep.Violations) == 0
	if !rep.Trusted {
		v := rep.Violations[0]
		rep.Reason = fmt.Sprintf("policy: %d violation(s), first at record %d: %s %s: %s", len(rep.Violations), v.Seq, v.Path, v.Digest, v.Reason)
		return rep, &Rejection{Step: 5, Reason: rep.Reason}
	}
	return rep, nil
}

func verify(ev *evidence.Evidence, opts Options, rep *Report) error {
	if opts.Identity == nil || opts.AK == nil {
		return errors.New("verify: identity and AK are required")
	}
	if ev.Version != evidence.Version {
		return reject(1, "evidence version %d, want %d", ev.Version, evidence.Version)
	}
	ident := opts.Identity
	id := ident.ID()
	keys := ident.Keys()
	rep.VM = VMReport{UUID: conceal.FormatUUID(ident.UUID), Instance: hex.EncodeToString(ident.Instance[:]), ID: hex.EncodeToString(id[:])}

	// Step 1: the quote.
	info, err := quote.Check(ev.Quote.Attest, ev.Quote.Signature, opts.AK)
	if err != nil {
		return reject(1, "quote: %v", err)
	}
	rep.Quote = QuoteReport{Clock: info.Clock, ResetCount: info.ResetCount, RestartCount: info.RestartCount, Safe: info.Safe, FirmwareVersion: info.FirmwareVersion}
	if !info.Safe {
		return reject(1, "quote clockInfo.safe is false: the TPM clock may have gone back, so the quote's time cannot be trusted")
	}
	if len(info.PCRs) != len(ev.PCRValues) {
		return reject(1, "quote covers %d PCRs but the evidence gives %d values", len(info.PCRs), len(ev.PCRValues))
	}
	vals := make([][32]byte, len(ev.PCRValues))
	pcrIdx := -1
	for i, pv := range ev.PCRValues {
		if int(pv.Index) != info.PCRs[i] {
			return reject(1, "PCR value %d is for PCR %d but the quote's selection has PCR %d there", i, pv.Index, info.PCRs[i])
		}
		if len(pv.SHA256) != 32 {
			return reject(1, "PCR %d value has %d bytes", pv.Index, len(pv.SHA256))
		}
		copy(vals[i][:], pv.SHA256)
		if pv.Index == ev.PCR {
			pcrIdx = i
		}
	}
	if !bytes.Equal(quote.PCRDigest(vals), info.PCRDigest) {
		return reject(1, "PCR values do not match the quote's PCR digest")
	}
	if pcrIdx < 0 {
		return reject(1, "quote does not cover the multiplexer PCR %d", ev.PCR)
	}
	if opts.PCR != 0 && int(ev.PCR) != opts.PCR {
		return reject(1, "evidence is for PCR %d, verifier expects PCR %d", ev.PCR, opts.PCR)
	}
	rep.PCR = int(ev.PCR)
	rep.PCRValue = hex.EncodeToString(vals[pcrIdx][:])
	for i, pv := range ev.PCRValues {
		rep.HostPCRs = append(rep.HostPCRs, PCRReport{Index: int(pv.Index), SHA256: hex.EncodeToString(vals[i][:])})
	}
	// extraData: fresh for our nonce and this VM, or the final quote of
	// this VM's teardown (checked in step 4 once the records are known).
	var finalCheck []byte
	switch ev.Kind {
	case evidence.KindQuote:
		if len(opts.Nonce) == 0 {
			return reject(1, "no nonce given for fresh evidence")
		}
		want := conceal.NonceData(opts.Nonce, id)
		if b := ev.Batched; b != nil {
			// One quote served many requests: extraData is a Merkle root
			// and the path must lead from this request's value to it.
			if b.Count < 2 || b.Count > 1<<32 || len(b.Path) > 64 {
				return reject(1, "batched quote proof of %d leaves with a %d-step path is malformed", b.Count, len(b.Path))
			}
			path := make([]conceal.Digest, len(b.Path))
			for i, p := range b.Path {
				if len(p) != 32 {
					return reject(1, "batched quote proof step %d has %d bytes", i, len(p))
				}
				copy(path[i][:], p)
			}
			root, ok := conceal.MerkleVerify(want, b.Index, b.Count, path)
			if !ok || !bytes.Equal(info.ExtraData, root[:]) {
				return reject(1, "batched quote does not cover H(nonce || id): stale or replayed evidence, or evidence for another VM")
			}
			rep.Batched = true
		} else if !bytes.Equal(info.ExtraData, want[:]) {
			return reject(1, "quote extraData does not match H(nonce || id): stale or replayed evidence, or evidence for another VM")
		}
		rep.Fresh = true
	case evidence.KindFinal:
		if !opts.PostMortem {
			return reject(1, "evidence is a post-mortem quote, not fresh for the nonce (use post-mortem verification)")
		}
		finalCheck = info.ExtraData
	default:
		return reject(1, "unknown evidence kind %q", ev.Kind)
	}

	// Step 2: replay the public log to the quoted PCR, from zero or from
	// the verifier's own checkpoint.
	epochRec, err := record.UnmarshalEpoch(ev.Epoch.Record)
	if err != nil {
		return reject(2, "epoch record: %v", err)
	}
	epochHash := record.Hash(ev.Epoch.Record)
	cp := opts.Checkpoint
	var pcr conceal.Digest
	var next, s0, prevG, firstBatch uint64
	var last []byte
	if cp != nil {
		if ev.From == nil || ev.From.Batch != cp.Batch || ev.From.Records != cp.Records {
			return reject(2, "evidence is not the delta after the verifier's checkpoint (batch %d, %d records)", cp.Batch, cp.Records)
		}
		if !bytes.Equal(cp.ID, id[:]) {
			return reject(2, "the checkpoint belongs to another VM instance")
		}
		if !bytes.Equal(cp.EpochHash, epochHash[:]) {
			return reject(2, "evidence is for another epoch than the checkpoint: the host rebooted; verify in full")
		}
		copy(pcr[:], cp.PCR)
		next, s0, prevG, firstBatch = cp.NextG, cp.Records, cp.LastG, cp.Batch+1
		last = cp.LastRecord
		rep.Ended = cp.Ended
		if err := rep.loadBindings(cp.Bindings); err != nil {
			return err
		}
	} else if ev.From != nil {
		return reject(2, "evidence is a delta from batch %d but the verifier has no checkpoint", ev.From.Batch)
	}
	total := 0
	for i, b := range ev.Log {
		if b.G0 != next {
			return reject(2, "batch %d starts at global index %d, expected %d: a batch was dropped, added or reordered", firstBatch+uint64(i), b.G0, next)
		}
		if len(b.Entries)%evidence.EntrySize != 0 {
			return reject(2, "batch %d entries are %d bytes", firstBatch+uint64(i), len(b.Entries))
		}
		n := b.Entries.Len()
		first := b.G0 == 0
		if first {
			n++
		}
		if n == 0 {
			return reject(2, "batch %d is empty", firstBatch+uint64(i))
		}
		bh := conceal.NewBatchHasher(b.G0, uint32(n))
		if first {
			bh.Add(conceal.EpochLeaf(ev.Epoch.Record))
		}
		for j := 0; j < b.Entries.Len(); j++ {
			bh.Add(conceal.Leaf(b.Entries.At(j)))
		}
		v, _ := bh.Sum()
		pcr = conceal.ExtendPCR(pcr, v)
		next += uint64(n)
		total += b.Entries.Len()
	}
	if len(ev.Log) == 0 && cp == nil {
		return reject(2, "evidence has no log")
	}
	if pcr != vals[pcrIdx] {
		return reject(2, "log of %d batches replays to %x but quoted PCR %d is %x: the log was altered (a leaf changed, moved, dropped or reordered)", len(ev.Log), pcr[:8], ev.PCR, vals[pcrIdx][:8])
	}
	if epochRec.PCR != ev.PCR {
		return reject(2, "epoch record is for PCR %d, evidence claims PCR %d", epochRec.PCR, ev.PCR)
	}
	rep.Epoch = EpochReport{Number: ev.Epoch.Number, Host: epochRec.Host, BridgeVersion: epochRec.BridgeVersion, Time: epochRec.Time, Nonce: hex.EncodeToString(epochRec.Nonce[:])}
	rep.Batches, rep.LogEntries = int(firstBatch)+len(ev.Log), int(next)

	// Step 3: find this VM's records by their tags: n is the first s whose
	// tag is absent. With a checkpoint, records before it were found then;
	// the later ones can only be in the delta, since batches are in order.
	// Only this VM's own tags are looked for: those of the records the
	// evidence gives plus one more (so a hidden record shows), found in one
	// pass over the log; in the rare case the log holds more of them, the
	// window doubles and the log is scanned again.
	const dup = math.MaxUint64
	var where map[conceal.Digest]uint64
	for window := uint64(len(ev.Records)) + 1; ; window *= 2 {
		want := make(map[conceal.Digest]uint64, window) // tag -> s
		for s := s0; s < s0+window; s++ {
			want[keys.Tag(s)] = s
		}
		where = make(map[conceal.Digest]uint64, window) // tag -> global index
		for _, b := range ev.Log {
			g := b.G0
			if b.G0 == 0 {
				g = 1
			}
			for j := 0; j < b.Entries.Len(); j++ {
				var t conceal.Digest
				copy(t[:], b.Entries[j*evidence.EntrySize:])
				if _, ours := want[t]; !ours {
					continue
				}
				if _, seen := where[t]; seen {
					where[t] = dup
				} else {
					where[t] = g + uint64(j)
				}
			}
		}
		if _, last := where[keys.Tag(s0+window-1)]; !last || window >= uint64(total)+1 {
			break
		}
	}
	entry := func(g uint64) (t, c conceal.Digest) {
		lo, hi := 0, len(ev.Log)-1
		for lo < hi {
			mid := (lo + hi + 1) / 2
			if ev.Log[mid].G0 <= g {
				lo = mid
			} else {
				hi = mid - 1
			}
		}
		b := ev.Log[lo]
		off := int(g - b.G0)
		if b.G0 == 0 {
			off--
		}
		return b.Entries.At(off)
	}
	var tags []uint64 // tags[i] is the global index of record s0+i
	for s := s0; ; s++ {
		g, ok := where[keys.Tag(s)]
		if !ok {
			break
		}
		if g == dup {
			return reject(3, "record %d: its tag appears more than once in the log", s)
		}
		tags = append(tags, g)
	}
	n := s0 + uint64(len(tags))
	rep.Records = int(n)
	if n == 0 {
		return reject(3, "no record of this VM instance is in the log: wrong identity, or the log is another host's")
	}

	// Step 4: every record matches its commitment, in order, genesis first,
	// nothing after teardown.
	bySeq := make(map[uint64]uint64, len(tags)) // global index -> s
	for i, g := range tags {
		bySeq[g] = s0 + uint64(i)
	}
	for s := s0; s < n; s++ {
		i := s - s0
		g := tags[i]
		if i >= uint64(len(ev.Records)) {
			return reject(4, "record %d missing: its tag is at global index %d", s, g)
		}
		r := ev.Records[i]
		if r.G != g {
			other, isOurs := bySeq[r.G]
			switch {
			case !isOurs:
				return reject(4, "record %d claims global index %d, which holds none of this VM's tags (its tag is at global index %d)", s, r.G, g)
			case other > s && !recordAt(ev.Records[i+1:], g):
				return reject(4, "record %d missing: its tag is at global index %d", s, g)
			default:
				return reject(4, "records out of order: position %d holds record %d (global index %d), expected record %d (global index %d)", s, other, r.G, s, g)
			}
		}
		if s > 0 && g <= prevG {
			return reject(4, "record %d at global index %d does not follow record %d at %d", s, g, s-1, prevG)
		}
		prevG = g
		_, c := entry(g)
		if want := keys.Commit(id, s, record.Hash(r.R)); want != c {
			return reject(4, "record %d does not match its commitment at global index %d: its content was altered or it belongs to another VM", s, g)
		}
		rec, err := record.Unmarshal(r.R)
		if err != nil {
			return reject(4, "record %d: %v", s, err)
		}
		if rep.Ended {
			return reject(4, "record %d follows the teardown record %d", s, s-1)
		}
		if err := rep.add(s, g, rec, ident, opts); err != nil {
			return err
		}
		last = r.R
	}
	if uint64(len(ev.Records)) > n-s0 {
		return reject(4, "record %d has no tag in the log: the evidence holds %d records, the log %d", n, s0+uint64(len(ev.Records)), n)
	}
	if finalCheck != nil {
		if !rep.Ended {
			return reject(4, "post-mortem evidence but the VM's last record is not a teardown")
		}
		want := conceal.FinalData(id, record.Hash(last))
		if !bytes.Equal(finalCheck, want[:]) {
			return reject(1, "final quote extraData does not match H(final || id || H(teardown)): it is not this VM's post-mortem quote")
		}
	}
	rep.Checkpoint = &Checkpoint{
		ID: id[:], EpochHash: epochHash[:], Batch: firstBatch + uint64(len(ev.Log)) - 1, NextG: next,
		PCR: pcr[:], Records: n, LastG: prevG, LastRecord: last, Ended: rep.Ended, Bindings: rep.boundList(),
	}
	return nil
}

func recordAt(recs []evidence.Record, g uint64) bool {
	for _, r := range recs {
		if r.G == g {
			return true
		}
	}
	return false
}
