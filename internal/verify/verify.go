// Package verify is the tenant's verifier: given evidence for one VM, the
// verifier's nonce, the VM's identity (with its key K) and a trusted AK, it
// performs the six checks of docs/protocol.md (Verification) and reports what it found. It is
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
	// AK is the trusted attestation key of the host: a shortcut for a
	// one-element AKs.
	AK *ecdsa.PublicKey
	// AKs are the trusted hosts' attestation keys. A VM that moved by live
	// migration has one segment of history per stay on a host, each
	// verified against its host's AK, which must be among these.
	AKs []*ecdsa.PublicKey
	// LastSegmentOnly verifies only the evidence's own segment against
	// the AKs; the earlier segments of a migrated VM are taken as they are
	// (their chaining is still checked on their records in clear, and the
	// report marks them unverified). It is for a destination bridge that
	// accepts a handover and knows only its peer's AK: the tenant's
	// verifier checks the whole chain. Such a report has no checkpoint,
	// and a vTPM VM's IMA entries are not paired with its extends.
	LastSegmentOnly bool
	// NoPairing skips pairing a vTPM VM's IMA entries with its anchored
	// PCR 10 extends (the vPCRs still replay from the records). It is for
	// a destination bridge checking a handover: a guest's own entries,
	// suppressed, late or invented, are the tenant verifier's to judge,
	// and are no reason to refuse the VM (which would leave it running on
	// the destination without attestation). The tenant never sets it.
	NoPairing bool
	// PCR, when non-zero, is the multiplexer PCR the verifier expects.
	PCR int
	// AllowResettablePCR accepts evidence anchored in a PCR above 15 (16
	// and 23 can be reset at locality 0 without a reboot, so whoever
	// reaches the host TPM could truncate the history). For tests only.
	AllowResettablePCR bool
	// ExpectUUID, when non-zero, is the VM the verifier means to attest,
	// known to it independently of the evidence and identity files (which
	// come from the party being attested): the identity's uuid must be it.
	ExpectUUID [16]byte
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
	// left (Report.Checkpoint). Delta evidence (evidence.From set) must be
	// the delta after it, and only the delta is replayed and checked; full
	// evidence is verified in full. Either way the checkpoint is a
	// high-water mark: evidence that shows less of the VM's history than
	// it, another TPM power cycle, or an older TPM clock, is rejected as a
	// rollback.
	Checkpoint *Checkpoint
}

// Checkpoint is what a verifier keeps after verifying a VM's evidence so
// that it can later verify only what came after: the log position and the
// PCR value there (trusted because a verified quote covered them), the VM's
// record count, the global index and content of its last record, and
// whether it had ended. Keep it with the identity: it is the verifier's
// state, never taken from evidence.
type Checkpoint struct {
	ID        []byte `json:"id"` // the VM instance it belongs to
	EpochHash []byte `json:"epoch_sha256"`
	// ResetCount and Clock are the TPM's counters in the quote that was
	// verified: the high-water mark later evidence must not fall below.
	ResetCount uint32 `json:"reset_count"`
	Clock      uint64 `json:"clock"`
	// VTPM says the VM has a bridge-served vTPM: its evidence must then be
	// verified in full.
	VTPM       bool   `json:"vtpm,omitempty"`
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
	// Segments are the segments of the VM's history verified so far
	// (live migration, chain.go), oldest first; the last is the one the
	// fields above describe.
	Segments []SegmentMark `json:"segments,omitempty"`
}

// MinNonce is the shortest verifier nonce accepted: a nonce must be
// unpredictable to the host, so shorter ones are refused as misuse.
const MinNonce = 16

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
	if va, ok := opts.Appraiser.(VPCRAppraiser); ok && err == nil {
		rep.Violations = append(rep.Violations, va.AppraiseVPCRs(rep.VTPM)...)
	}
	if err == nil {
		err = rep.judge()
	}
	if err != nil {
		rep.Checkpoint = nil // a rejected report leaves nothing to build on
		var rj *Rejection
		if errors.As(err, &rj) {
			rep.Reason = rj.Reason
		}
		return rep, err
	}
	return rep, nil
}

// judge is step 5's verdict: the evidence is trusted when no record
// violated the policy.
func (rep *Report) judge() error {
	rep.Trusted = len(rep.Violations) == 0
	if rep.Trusted {
		return nil
	}
	v := rep.Violations[0]
	return reject(5, "policy: %d violation(s), first at record %d: %s %s: %s", len(rep.Violations), v.Seq, v.Path, v.Digest, v.Reason)
}

// verification is one run of the checks over one evidence: its inputs, the
// report it fills, and what each step hands the next.
type verification struct {
	ev    *evidence.Evidence
	opts  Options
	rep   *Report
	ident *conceal.Identity
	id    conceal.Digest
	keys  *conceal.Keys

	// The segment of the VM's history this evidence is (chain.go).
	ak       *ecdsa.PublicKey // the trusted AK that signed it
	host     string           // its host, as its epoch record names it
	seg      int              // its index in the chain
	segFirst uint64           // the number of its first record
	earlier  bool             // a Previous segment: final evidence, ended by migrated-out
	lastSeg  bool             // the evidence's own segment (the current one)
	cp       *Checkpoint      // the verifier's checkpoint, for the current segment only
	segEnd   *record.Record   // its migrated-out record, once seen
	chainLen int              // how many segments the chain has

	// Set by step 1.
	info       *quote.Info
	quoted     conceal.Digest // the quoted value of the multiplexer PCR
	finalCheck []byte         // a final quote's extraData, checked in step 4

	// Set by step 2.
	epochRec   *record.Epoch
	epochHash  conceal.Digest
	pcr        conceal.Digest // the log replayed (from the checkpoint)
	next       uint64         // the global index after the log
	firstBatch uint64         // the number of the log's first batch
	total      int            // how many entries the log holds
	s0         uint64         // the first record the evidence must hold
	prevG      uint64         // the global index of record s0-1
	last       []byte         // the last record verified

	// Set by step 3: tags[i] is the global index of record s0+i.
	tags []uint64

	// Set by step 4 for a VM with a bridge-served vTPM.
	vt *vtpmTrack

	// marks are the chain's segments for the checkpoint (chain.go).
	marks []SegmentMark
}

func verify(ev *evidence.Evidence, opts Options, rep *Report) error {
	if opts.AK != nil {
		opts.AKs = append([]*ecdsa.PublicKey{opts.AK}, opts.AKs...)
	}
	if opts.Identity == nil || len(opts.AKs) == 0 {
		return errors.New("verify: identity and AK are required")
	}
	if ev.Kind == evidence.KindQuote && len(opts.Nonce) > 0 && len(opts.Nonce) < MinNonce {
		return fmt.Errorf("verify: the nonce is %d bytes; use at least %d random bytes", len(opts.Nonce), MinNonce)
	}
	if opts.ExpectUUID != ([16]byte{}) && opts.ExpectUUID != opts.Identity.UUID {
		return reject(4, "identity is for vm uuid %s, but the verifier expects %s: this is another VM's evidence", conceal.FormatUUID(opts.Identity.UUID), conceal.FormatUUID(opts.ExpectUUID))
	}
	if ev.Version != evidence.Version {
		return reject(1, "evidence version %d, want %d", ev.Version, evidence.Version)
	}
	return verifyChain(ev, opts, rep)
}

// steps runs the checks of one segment's evidence.
func (v *verification) steps() error {
	steps := []func() error{
		v.checkQuote,   // 1: the quote and the PCR values it covers
		v.checkFresh,   // 1: extraData binds the nonce and this VM
		v.start,        // 2: the epoch record and the verifier's checkpoint
		v.replay,       // 2: the log replays to the quoted PCR
		v.findTags,     // 3: this VM's records, by their tags
		v.highWater,    // 3: no less history than the verifier saw before
		v.checkRecords, // 4 (and 5, per record): records match commitments
		v.checkVTPM,    // 4: vTPM mode: IMA entries pair with anchored extends
		v.checkFinal,   // 4: a post-mortem quote covers the teardown
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// checkQuote is step 1: the quote is signed by the AK, its clock is safe,
// and the evidence's PCR values are the ones it covers, the multiplexer PCR
// among them.
func (v *verification) checkQuote() error {
	ev, rep := v.ev, v.rep
	info, err := quote.Check(ev.Quote.Attest, ev.Quote.Signature, v.ak)
	if err != nil {
		return reject(1, "%squote: %v", v.where(), err)
	}
	rep.HostPCRs = nil
	v.info = info
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
	if v.opts.PCR != 0 && int(ev.PCR) != v.opts.PCR {
		return reject(1, "evidence is for PCR %d, verifier expects PCR %d", ev.PCR, v.opts.PCR)
	}
	if ev.PCR > 15 && !v.opts.AllowResettablePCR {
		return reject(1, "evidence is anchored in PCR %d, which can be reset without a reboot: whoever reaches the host TPM could truncate this history (the bridge must use a PCR of 0-15)", ev.PCR)
	}
	v.quoted = vals[pcrIdx]
	rep.PCR = int(ev.PCR)
	rep.PCRValue = hex.EncodeToString(v.quoted[:])
	for i, pv := range ev.PCRValues {
		rep.HostPCRs = append(rep.HostPCRs, PCRReport{Index: int(pv.Index), SHA256: hex.EncodeToString(vals[i][:])})
	}
	return nil
}

// checkFresh is the rest of step 1: the quote's extraData is fresh for the
// verifier's nonce and this VM, or it is the final quote of this VM's
// teardown (checked in step 4 once the records are known).
func (v *verification) checkFresh() error {
	ev, info := v.ev, v.info
	if v.earlier && ev.Kind != evidence.KindFinal {
		return reject(1, "%sa previous segment must be the final (post-mortem) evidence its host kept after the migrated-out record, not %q evidence", v.where(), ev.Kind)
	}
	switch ev.Kind {
	case evidence.KindQuote:
		if len(v.opts.Nonce) == 0 {
			return reject(1, "no nonce given for fresh evidence")
		}
		want := conceal.NonceData(v.opts.Nonce, v.id)
		if b := ev.Batched; b != nil {
			if err := checkBatched(b, want, info.ExtraData); err != nil {
				return err
			}
			v.rep.Batched = true
		} else if !bytes.Equal(info.ExtraData, want[:]) {
			return reject(1, "quote extraData does not match H(nonce || id): stale or replayed evidence, or evidence for another VM")
		}
		v.rep.Fresh = true
	case evidence.KindFinal:
		if !v.opts.PostMortem && !v.earlier {
			return reject(1, "evidence is a post-mortem quote, not fresh for the nonce (use post-mortem verification)")
		}
		v.finalCheck = info.ExtraData
	default:
		return reject(1, "unknown evidence kind %q", ev.Kind)
	}
	return nil
}

// checkBatched checks a quote that served many requests at once: its
// extraData is a Merkle root and the path must lead from this request's
// value want to it.
func checkBatched(b *evidence.QuoteProof, want conceal.Digest, extraData []byte) error {
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
	if !ok || !bytes.Equal(extraData, root[:]) {
		return reject(1, "batched quote does not cover H(nonce || id): stale or replayed evidence, or evidence for another VM")
	}
	return nil
}

// start opens step 2: the log is replayed from zero, or from the
// verifier's own checkpoint when it has one, and then the evidence must be
// exactly the delta after it.
func (v *verification) start() error {
	ev, cp := v.ev, v.cp
	v.s0 = v.segFirst
	epochRec, err := record.UnmarshalEpoch(ev.Epoch.Record)
	if err != nil {
		return reject(2, "epoch record: %v", err)
	}
	v.epochRec = epochRec
	v.epochHash = record.EpochHash(ev.Epoch.Record)
	if err := v.checkEpoch(); err != nil {
		return err
	}
	v.pcr = epochRec.StartValue
	if cp == nil || ev.From == nil {
		if ev.From != nil {
			return reject(2, "evidence is a delta from batch %d but the verifier has no checkpoint", ev.From.Batch)
		}
		return nil
	}
	if ev.From.Batch != cp.Batch || ev.From.Records != cp.Records {
		return reject(2, "evidence is not the delta after the verifier's checkpoint (batch %d, %d records)", cp.Batch, cp.Records)
	}
	if !bytes.Equal(cp.ID, v.id[:]) {
		return reject(2, "the checkpoint belongs to another VM instance")
	}
	copy(v.pcr[:], cp.PCR)
	v.next, v.s0, v.prevG, v.firstBatch = cp.NextG, cp.Records, cp.LastG, cp.Batch+1
	v.last = cp.LastRecord
	v.rep.Ended = cp.Ended
	return v.rep.loadBindings(cp.Bindings)
}

// checkEpoch binds the epoch record to the quote: the quote was taken in
// the TPM power cycle the epoch was opened in (same resetCount and
// restartCount: a TPM Reset or Restart can reset PCRs, and only a new epoch
// may follow one), by the AK the epoch names, and not before the epoch
// opened on the TPM's clock.
func (v *verification) checkEpoch() error {
	er, info := v.epochRec, v.info
	if info.ResetCount != er.ResetCount {
		return reject(2, "the quote's TPM resetCount is %d but the epoch was opened at resetCount %d: the log belongs to another power cycle of the TPM (a replayed or re-rooted log)", info.ResetCount, er.ResetCount)
	}
	if info.RestartCount != er.RestartCount {
		return reject(2, "the quote's TPM restartCount is %d but the epoch was opened at restartCount %d: the TPM was restarted (suspend or hibernation), which can reset PCRs, so this epoch's history cannot be proven live", info.RestartCount, er.RestartCount)
	}
	if info.Clock < er.Clock {
		return reject(2, "the quote's TPM clock (%d ms) is before the epoch opened (%d ms): the TPM was cleared since", info.Clock, er.Clock)
	}
	if ak := quote.AKFingerprint(v.ak); er.AK != ak {
		return reject(2, "the epoch was opened with AK sha256:%x, not the trusted AK sha256:%x", er.AK, ak)
	}
	return nil
}

// highWater enforces the verifier's checkpoint as a high-water mark: the
// same VM instance, epoch and TPM power cycle, a TPM clock not older, and
// no fewer of the VM's records or log entries than it saw before. Host
// root who resets an insecure PCR and re-extends a prefix of the log can
// fool a first-time verifier but not one that checked before.
func (v *verification) highWater() error {
	cp := v.cp
	if cp == nil {
		return nil
	}
	n := v.s0 + uint64(len(v.tags))
	if !v.sameSegment(cp) {
		// The VM moved on since: chain.go checked the segments against
		// the checkpoint's; the record count is still a high-water mark.
		switch {
		case !bytes.Equal(cp.ID, v.id[:]):
			return reject(2, "the checkpoint belongs to another VM instance")
		case n < cp.Records:
			return reject(3, "rollback: the log holds %d records of this VM but %d were verified before: history was truncated", n, cp.Records)
		}
		return nil
	}
	switch {
	case !bytes.Equal(cp.ID, v.id[:]):
		return reject(2, "the checkpoint belongs to another VM instance")
	case !bytes.Equal(cp.EpochHash, v.epochHash[:]):
		return reject(2, "rollback: evidence is for another epoch than the checkpoint (a VM instance lives in one epoch)")
	case v.info.ResetCount != cp.ResetCount:
		return reject(2, "rollback: the quote's TPM resetCount is %d, the checkpoint's %d", v.info.ResetCount, cp.ResetCount)
	case v.info.Clock < cp.Clock:
		return reject(2, "rollback: the quote's TPM clock (%d ms) is older than the checkpoint's (%d ms)", v.info.Clock, cp.Clock)
	case n < cp.Records:
		return reject(3, "rollback: the log holds %d records of this VM but %d were verified before: history was truncated", n, cp.Records)
	case v.next < cp.NextG:
		return reject(2, "rollback: the log ends at global index %d but reached %d before", v.next, cp.NextG)
	}
	return nil
}

// replay is step 2: every batch of the public log, in order and without a
// gap, replays to the quoted value of the multiplexer PCR.
func (v *verification) replay() error {
	ev, rep, epochRec := v.ev, v.rep, v.epochRec
	for i, b := range ev.Log {
		batch := v.firstBatch + uint64(i)
		if b.G0 != v.next {
			return reject(2, "batch %d starts at global index %d, expected %d: a batch was dropped, added or reordered", batch, b.G0, v.next)
		}
		d, n, err := conceal.BatchValue(b.G0, ev.Epoch.Record, b.Entries)
		if err != nil {
			return reject(2, "batch %d: %v", batch, err)
		}
		if n == 0 {
			return reject(2, "batch %d is empty", batch)
		}
		v.pcr = conceal.ExtendPCR(v.pcr, d)
		v.next += uint64(n)
		v.total += b.Entries.Len()
	}
	if len(ev.Log) == 0 && v.cp == nil {
		return reject(2, "evidence has no log")
	}
	if v.pcr != v.quoted {
		return reject(2, "log of %d batches replays to %x but quoted PCR %d is %x: the log was altered (a leaf changed, moved, dropped or reordered)", len(ev.Log), v.pcr[:8], ev.PCR, v.quoted[:8])
	}
	if epochRec.PCR != ev.PCR {
		return reject(2, "epoch record is for PCR %d, evidence claims PCR %d", epochRec.PCR, ev.PCR)
	}
	rep.Epoch = EpochReport{SHA256: hex.EncodeToString(v.epochHash[:]), Host: epochRec.Host, BridgeVersion: epochRec.BridgeVersion, Time: epochRec.Time,
		Nonce: hex.EncodeToString(epochRec.Nonce[:]), ResetCount: epochRec.ResetCount, RestartCount: epochRec.RestartCount, Clock: epochRec.Clock,
		StartValue: hex.EncodeToString(epochRec.StartValue[:]), ClearDisabled: epochRec.ClearDisabled}
	rep.Batches, rep.LogEntries = int(v.firstBatch)+len(ev.Log), int(v.next)
	return nil
}

// dupTag marks a tag found at more than one global index.
const dupTag = math.MaxUint64

// findTags is step 3: this VM's records are found by their tags, and the
// count n is the first s whose tag is absent. With a checkpoint, records
// before it were found then; the later ones can only be in the delta,
// since batches are in order.
func (v *verification) findTags() error {
	where := v.tagWindow()
	for s := v.s0; ; s++ {
		g, ok := where[v.keys.Tag(s)]
		if !ok {
			break
		}
		if g == dupTag {
			return reject(3, "record %d: its tag appears more than once in the log", s)
		}
		v.tags = append(v.tags, g)
	}
	n := v.s0 + uint64(len(v.tags))
	v.rep.Records = int(n)
	if n == 0 {
		return reject(3, "no record of this VM instance is in the log: wrong identity, or the log is another host's")
	}
	if len(v.tags) == 0 && v.s0 == v.segFirst {
		return reject(3, "%sno record of this VM from record %d on is in the log: the segment does not continue the VM's numbering, or it is another VM's", v.where(), v.s0)
	}
	return nil
}

// tagWindow maps the tags of this VM's records from s0 on to their global
// indices (dupTag for a tag seen twice). Only this VM's own tags are looked
// for: those of the records the evidence gives plus one more (so a hidden
// record shows), found in one pass over the log; in the rare case the log
// holds more of them, the window doubles and the log is scanned again.
func (v *verification) tagWindow() map[conceal.Digest]uint64 {
	s0 := v.s0
	for window := uint64(len(v.ev.Records)) + 1; ; window *= 2 {
		want := make(map[conceal.Digest]uint64, window) // tag -> s
		for s := s0; s < s0+window; s++ {
			want[v.keys.Tag(s)] = s
		}
		where := make(map[conceal.Digest]uint64, window) // tag -> global index
		for _, b := range v.ev.Log {
			g := b.G0
			if b.G0 == 0 {
				g = 1
			}
			for j := range b.Entries.Len() {
				t, _ := b.Entries.At(j)
				if _, ours := want[t]; !ours {
					continue
				}
				if _, seen := where[t]; seen {
					where[t] = dupTag
				} else {
					where[t] = g + uint64(j)
				}
			}
		}
		if _, last := where[v.keys.Tag(s0+window-1)]; !last || window >= uint64(v.total)+1 {
			return where
		}
	}
}

// entry returns the tag and commitment at global index g of the log.
func (v *verification) entry(g uint64) (t, c conceal.Digest) {
	log := v.ev.Log
	lo, hi := 0, len(log)-1
	for lo < hi {
		mid := (lo + hi + 1) / 2
		if log[mid].G0 <= g {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	b := log[lo]
	off := int(g - b.G0)
	if b.G0 == 0 {
		off--
	}
	return b.Entries.At(off)
}

// checkRecords is step 4: every record the tags found is in the evidence,
// in order, genesis first, nothing after teardown, and matches its
// commitment; each is folded into the report and appraised (step 5).
func (v *verification) checkRecords() error {
	ev, s0 := v.ev, v.s0
	n := s0 + uint64(len(v.tags))
	bySeq := make(map[uint64]uint64, len(v.tags)) // global index -> s
	for i, g := range v.tags {
		bySeq[g] = s0 + uint64(i)
	}
	for s := s0; s < n; s++ {
		i := s - s0
		g := v.tags[i]
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
		if s > v.segFirst && g <= v.prevG {
			return reject(4, "record %d at global index %d does not follow record %d at %d", s, g, s-1, v.prevG)
		}
		v.prevG = g
		if err := v.checkRecord(s, g, r.R); err != nil {
			return err
		}
		v.last = r.R
	}
	if uint64(len(ev.Records)) > n-s0 {
		return reject(4, "record %d has no tag in the log: the evidence holds %d records, the log %d", n, s0+uint64(len(ev.Records)), n)
	}
	return nil
}

// checkRecord checks record s, found at global index g, against its
// commitment and adds it to the report.
func (v *verification) checkRecord(s, g uint64, raw []byte) error {
	_, c := v.entry(g)
	if want := v.keys.Commit(v.id, s, record.Hash(raw)); want != c {
		return reject(4, "record %d does not match its commitment at global index %d: its content was altered or it belongs to another VM", s, g)
	}
	rec, err := record.Unmarshal(raw)
	if err != nil {
		return reject(4, "record %d: %v", s, err)
	}
	if rec.Kind == record.KindGenesis && rec.Genesis.Epoch != v.epochHash {
		return reject(4, "genesis record names epoch %x but the log is epoch %x: the VM's leaves were replanted in another epoch", rec.Genesis.Epoch[:8], v.epochHash[:8])
	}
	if rec.Kind == record.KindGenesis && len(rec.Genesis.VTPMBanks) > 0 {
		if v.vt, err = newVTPMTrack(rec.Genesis.VTPMBanks); err != nil {
			return reject(4, "genesis record's vTPM banks: %v", err)
		}
	}
	if rec.Kind == record.KindMigratedIn {
		if err := v.arrived(s, rec.MigratedIn); err != nil {
			return err
		}
	}
	if rec.Kind == record.KindTPM && v.vt == nil && (v.s0 == 0 || v.s0 == v.segFirst) {
		return reject(4, "record %d is a vTPM event but the VM's genesis declares no vTPM", s)
	}
	if v.segEnd != nil {
		return reject(4, "%srecord %d follows the migrated-out record %d: the VM had left this host", v.where(), s, s-1)
	}
	if rec.Kind == record.KindMigratedOut {
		v.segEnd = rec
	}
	if v.vt != nil {
		if err := v.vt.add(s, rec); err != nil {
			return err
		}
	}
	if v.rep.Ended {
		return reject(4, "record %d follows the teardown record %d", s, s-1)
	}
	return v.rep.add(s, g, rec, v.ident, v.opts)
}

// checkVTPM ends step 4 for a VM with a bridge-served vTPM: its vPCRs are
// the replay of its event records, and the agent's IMA entries pair one to
// one with the anchored PCR 10 extends (vtpm.go). The pairing needs every
// record from genesis on, so delta evidence of a vTPM VM is refused.
func (v *verification) checkVTPM() error {
	if !v.lastSeg {
		return nil // IMA entries may pair with extends of an earlier segment: checked once, at the end
	}
	if v.vt == nil {
		if v.s0 > 0 && v.cp != nil && v.cp.VTPM {
			return reject(4, "the VM has a vTPM: verify its evidence in full (incremental pairing of IMA entries with anchored extends is not supported)")
		}
		return nil
	}
	if v.opts.NoPairing {
		v.vt.taken = true
	}
	return v.vt.check(v.rep)
}

// checkFinal ends step 4 for post-mortem evidence: the VM ended, and the
// final quote's extraData binds its teardown record.
func (v *verification) checkFinal() error {
	if v.earlier && v.segEnd == nil {
		return reject(4, "%sa previous segment must end with a migrated-out record", v.where())
	}
	if v.finalCheck == nil {
		return nil
	}
	if !v.rep.Ended && v.segEnd == nil {
		return reject(4, "%spost-mortem evidence but the VM's last record is not a teardown (or a migrated-out record)", v.where())
	}
	want := conceal.FinalData(v.id, record.Hash(v.last))
	if !bytes.Equal(v.finalCheck, want[:]) {
		return reject(1, "%sfinal quote extraData does not match H(final || id || H(last record)): it is not this VM's post-mortem quote", v.where())
	}
	return nil
}

// checkpoint is what step 6 leaves the verifier for next time.
func (v *verification) checkpoint() *Checkpoint {
	return &Checkpoint{
		ID: v.id[:], EpochHash: v.epochHash[:], Batch: v.firstBatch + uint64(len(v.ev.Log)) - 1, NextG: v.next,
		PCR: v.pcr[:], Records: v.s0 + uint64(len(v.tags)), LastG: v.prevG, LastRecord: v.last, Ended: v.rep.Ended, Bindings: v.rep.boundList(),
		ResetCount: v.info.ResetCount, Clock: v.info.Clock, VTPM: v.vt != nil,
		Segments: v.marks,
	}
}

func recordAt(recs []evidence.Record, g uint64) bool {
	for _, r := range recs {
		if r.G == g {
			return true
		}
	}
	return false
}
