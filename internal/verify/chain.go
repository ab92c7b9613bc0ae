package verify

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
)

// Live migration (docs/protocol.md "Migration"): a VM's history is a chain
// of segments, one per stay on a host, each verified as a whole evidence
// against the trusted AK of its host, and linked to the one before by its
// migrated-in record. The rules, each a rejection with its reason:
//
//   - segment 0 starts with genesis record 0, every later segment with a
//     migrated-in record; every segment but the last ends with a
//     migrated-out record and is final (post-mortem) evidence;
//   - a segment is this VM's (the migrated-in record's uuid and instance,
//     and K: its records are found and committed under the VM's key);
//   - record numbers continue: a segment starts one after the previous
//     one's migrated-out record;
//   - migrated-in.Prev is the hash of the previous segment's migrated-out
//     record, migrated-in.SourceAK the AK that signed the previous
//     segment, migrated-in.SourceEpoch its epoch, and migrated-out.DestAK
//     the AK that signed the next segment;
//   - no two segments continue from one migrated-out record (a fork), in
//     the chain or against the verifier's checkpoint;
//   - a vTPM VM's vPCRs in the migrated-in record are the replay of its
//     earlier segments' vTPM events.

// SegmentReport is one segment of the VM's history in the report: a stay
// on one host, from the record that opened it (genesis or migrated-in) to
// the one that closed it (migrated-out or teardown), or on to now.
type SegmentReport struct {
	Index int    `json:"index"`
	Host  string `json:"host"` // from the segment's epoch record
	AK    string `json:"ak_sha256"`
	Epoch string `json:"epoch_sha256,omitempty"`
	Kind  string `json:"kind,omitempty"` // quote (fresh) or final
	First uint64 `json:"first_record"`
	Last  uint64 `json:"last_record"`
	Start string `json:"start"`         // genesis or migrated-in
	End   string `json:"end,omitempty"` // migrated-out, teardown, or empty (live)
	// DestHost is where a segment ended by migration sent the VM.
	DestHost string `json:"dest_host,omitempty"`
	// FromCheckpoint: verified before (incremental verification of a later
	// segment), not again now.
	FromCheckpoint bool `json:"from_checkpoint,omitempty"`
	// Unverified: taken as it is (Options.LastSegmentOnly).
	Unverified bool `json:"unverified,omitempty"`
}

// SegmentMark is what a checkpoint keeps of one segment: where it starts,
// its host's AK, the hashes of its first and (once ended) last record and
// of its final evidence, so that later evidence must show the same
// segments (no fork, no other history) and incremental verification need
// not verify the earlier ones again.
type SegmentMark struct {
	First    uint64 `json:"first"`
	Host     string `json:"host,omitempty"`
	AK       []byte `json:"ak_sha256"`
	Start    []byte `json:"start_sha256"`
	Prev     []byte `json:"prev_sha256,omitempty"`
	End      []byte `json:"end_sha256,omitempty"`
	Evidence []byte `json:"evidence_sha256,omitempty"`
}

// link is one segment of the chain being verified, with what the
// cross-segment rules need of its records (in clear; the per-segment
// verification authenticates them).
type link struct {
	ev     *evidence.Evidence
	ak     *ecdsa.PublicKey
	fp     [32]byte
	host   string
	epochH [32]byte
	first  uint64 // the number of its first record
	head   *record.Record
	headH  [32]byte
	tail   *record.Record
	tailH  [32]byte
	delta  bool
	taken  bool // not verified (Options.LastSegmentOnly)
}

// verifyChain verifies evidence as the chain of the VM's segments: the
// cross-segment rules on the records in clear, the checkpoint's segments,
// then each segment in order, its records authenticated under its host's
// AK and the VM's key.
func verifyChain(ev *evidence.Evidence, opts Options, rep *Report) error {
	ident, cp := opts.Identity, opts.Checkpoint
	id := ident.ID()
	rep.VM = VMReport{UUID: conceal.FormatUUID(ident.UUID), Instance: hex.EncodeToString(ident.Instance[:]), ID: hex.EncodeToString(id[:])}
	segs := ev.Segments()
	links := make([]*link, len(segs))
	for i, seg := range segs {
		l := &link{ev: seg, epochH: record.EpochHash(seg.Epoch.Record), delta: seg.From != nil}
		er, eerr := record.UnmarshalEpoch(seg.Epoch.Record)
		if eerr == nil {
			l.host = er.Host
		}
		if opts.LastSegmentOnly && i < len(segs)-1 {
			// Taken as it is: its AK is the one its epoch record names.
			l.taken = true
			if eerr == nil {
				l.fp = er.AK
			}
			links[i] = l
			continue
		}
		ak, err := resolveAK(seg, opts.AKs, i, len(segs))
		if err != nil {
			return err
		}
		l.ak, l.fp = ak, quote.AKFingerprint(ak)
		links[i] = l
	}
	if err := linkChain(links, ident, cp); err != nil {
		return err
	}
	marks := marksOf(links, cp)
	skip := 0
	if cp != nil && len(cp.Segments) > 0 {
		if err := checkSegments(cp, marks, links); err != nil {
			return err
		}
		if ev.From != nil {
			skip = len(links) - 1
		}
	}
	for i := range skip {
		m := cp.Segments[i]
		rep.Segments = append(rep.Segments, SegmentReport{Index: i, Host: m.Host, AK: hex.EncodeToString(m.AK), First: m.First,
			Last: cp.Segments[i+1].First - 1, Start: startOf(i), End: record.KindMigratedOut.String(), FromCheckpoint: true})
	}
	var vt *vtpmTrack
	var last *verification
	keys := ident.Keys()
	for i := skip; i < len(links); i++ {
		l := links[i]
		if l.taken {
			rep.Segments = append(rep.Segments, SegmentReport{Index: i, Host: l.host, AK: hex.EncodeToString(l.fp[:]), Epoch: hex.EncodeToString(l.epochH[:]),
				Kind: l.ev.Kind, First: l.first, Last: l.first + uint64(len(l.ev.Records)) - 1, Start: startOf(i), End: record.KindMigratedOut.String(), Unverified: true})
			continue
		}
		v := &verification{ev: l.ev, opts: opts, rep: rep, ident: ident, id: id, keys: keys,
			ak: l.ak, host: l.host, seg: i, segFirst: l.first, earlier: i < len(links)-1, lastSeg: i == len(links)-1, chainLen: len(links), vt: vt}
		if v.lastSeg {
			v.cp = cp
		}
		if err := v.steps(); err != nil {
			return err
		}
		vt = v.vt
		rep.Segments = append(rep.Segments, v.segmentReport(l))
		last = v
	}
	last.marks = marks
	if !opts.LastSegmentOnly {
		rep.Checkpoint = last.checkpoint()
	}
	return nil
}

func startOf(i int) string {
	if i == 0 {
		return record.KindGenesis.String()
	}
	return record.KindMigratedIn.String()
}

// resolveAK picks the trusted AK that signed segment i: the one the
// evidence names (its ak field, informational, only selects) if the
// quote's signature verifies with it, or any other it verifies with. With
// one trusted AK and one segment it is that AK whatever (step 1 then says
// why the quote does not verify).
func resolveAK(seg *evidence.Evidence, trusted []*ecdsa.PublicKey, i, n int) (*ecdsa.PublicKey, error) {
	named := sha256.Sum256(seg.AK)
	signed := func(k *ecdsa.PublicKey) bool {
		_, err := quote.Check(seg.Quote.Attest, seg.Quote.Signature, k)
		return err == nil
	}
	for _, k := range trusted {
		if len(seg.AK) > 0 && quote.AKFingerprint(k) == named && signed(k) {
			return k, nil
		}
	}
	for _, k := range trusted {
		if signed(k) {
			return k, nil
		}
	}
	if len(trusted) == 1 && n == 1 {
		return trusted[0], nil
	}
	what := "the evidence names no AK"
	if _, err := x509.ParsePKIXPublicKey(seg.AK); err == nil {
		what = fmt.Sprintf("it names AK sha256:%x", named)
	}
	where := ""
	if n > 1 {
		where = fmt.Sprintf("segment %d (host %q): ", i, seg.Host)
	}
	return nil, reject(1, "%suntrusted AK: the quote's signature verifies with none of the %d trusted AKs (%s): give every host's AK (--ak repeated, or --ek-ca with --enrolled)", where, len(trusted), what)
}

// linkChain applies the cross-segment rules to the chain's records in
// clear and sets each link's first record number.
func linkChain(links []*link, ident *conceal.Identity, cp *Checkpoint) error {
	n := len(links)
	for i, l := range links {
		recs := l.ev.Records
		if l.delta {
			if i != n-1 {
				return reject(2, "segment %d is incremental evidence: only the current segment may be", i)
			}
			if cp != nil && len(cp.Segments) > 0 {
				if len(cp.Segments) != n {
					return reject(2, "the VM moved to another host since the checkpoint (the evidence has %d segments, the checkpoint %d): ask its bridge for full evidence", n, len(cp.Segments))
				}
				l.first = cp.Segments[n-1].First
			}
			if len(recs) > 0 {
				if err := l.decodeTail(i); err != nil {
					return err
				}
			}
			continue
		}
		if len(recs) == 0 {
			if n == 1 {
				return nil // the segment's own checks say what is missing
			}
			return reject(3, "segment %d (host %q) holds no records", i, l.host)
		}
		head, err := record.Unmarshal(recs[0].R)
		if err != nil && n == 1 {
			return nil // the segment's own checks say what is wrong with it
		}
		if err != nil {
			return reject(4, "%s: its first record: %v", segName(i, l, n), err)
		}
		l.head, l.headH = head, record.Hash(recs[0].R)
		if err := l.decodeTail(i); err != nil {
			return err
		}
		switch {
		case i == 0 && head.Kind == record.KindMigratedIn:
			return reject(3, "missing segment: the VM's history starts with a migrated-in record (record %d, from host %q): its earlier segments, from the genesis on, are missing", head.MigratedIn.Seq, head.MigratedIn.SourceHost)
		case i == 0:
			l.first = 0 // genesis; the segment's own checks require it
			if g := head.Genesis; n > 1 && g != nil && (g.UUID != ident.UUID || g.Instance != ident.Instance) {
				return reject(4, "%s is another VM's: its genesis record is for uuid %s instance %x, not %s instance %x", segName(i, l, n), conceal.FormatUUID(g.UUID), g.Instance, conceal.FormatUUID(ident.UUID), ident.Instance)
			}
			continue
		case head.Kind != record.KindMigratedIn:
			return reject(4, "%s starts with a %s record, not migrated-in", segName(i, l, n), head.Kind)
		}
		if err := linkPair(links, i, ident); err != nil {
			return err
		}
		l.first = head.MigratedIn.Seq
	}
	for i, l := range links[:n-1] {
		if l.tail == nil || l.tail.Kind != record.KindMigratedOut {
			kind := "no"
			if l.tail != nil {
				kind = "a " + l.tail.Kind.String()
			}
			return reject(4, "%s ends with %s record, not migrated-out: only the VM's last segment may be live or torn down", segName(i, l, n), kind)
		}
	}
	return nil
}

func (l *link) decodeTail(i int) error {
	raw := l.ev.Records[len(l.ev.Records)-1].R
	tail, err := record.Unmarshal(raw)
	if err != nil {
		return reject(4, "segment %d: its last record: %v", i, err)
	}
	l.tail, l.tailH = tail, record.Hash(raw)
	return nil
}

func segName(i int, l *link, n int) string {
	if n == 1 {
		return "the evidence"
	}
	return fmt.Sprintf("segment %d (host %q)", i, l.host)
}

// linkPair checks that segment i continues segment i-1, in the order the
// reasons are most telling: another VM's segment, a fork, a missing
// segment, a segment that starts elsewhere, then each binding.
func linkPair(links []*link, i int, ident *conceal.Identity) error {
	prev, l := links[i-1], links[i]
	in := l.head.MigratedIn
	name, pname := segName(i, l, len(links)), segName(i-1, prev, len(links))
	if in.UUID != ident.UUID || in.Instance != ident.Instance {
		return reject(4, "%s is another VM's: its migrated-in record is for uuid %s instance %x, not %s instance %x", name, conceal.FormatUUID(in.UUID), in.Instance, conceal.FormatUUID(ident.UUID), ident.Instance)
	}
	for j := range i - 1 {
		if t := links[j].tail; t != nil && t.Kind == record.KindMigratedOut && links[j].tailH == in.Prev {
			return reject(4, "fork: %s continues from the migrated-out record that ends segment %d, as segment %d does: the VM was handed to two destinations", name, j, j+1)
		}
	}
	out := prev.tail
	if out == nil || out.Kind != record.KindMigratedOut {
		return nil // linkChain says the previous segment did not end by migration
	}
	mo := out.MigratedOut
	prevLast := prev.first + uint64(len(prev.ev.Records)) - 1
	if in.Prev != prev.tailH {
		if in.SourceAK != prev.fp && mo.DestAK != l.fp {
			return reject(4, "missing segment between segments %d and %d: %s left for host %q (AK sha256:%x), but %s arrived from host %q (AK sha256:%x)", i-1, i, pname, mo.DestHost, mo.DestAK[:8], name, in.SourceHost, in.SourceAK[:8])
		}
		return reject(4, "%s does not start where %s ended: its migrated-in record names migrated-out record sha256:%x, but %s ended with sha256:%x (record %d)", name, pname, in.Prev[:8], pname, prev.tailH[:8], prevLast)
	}
	switch {
	case in.Seq != prevLast+1:
		return reject(4, "%s starts at record %d, but %s ended at record %d: record numbers must continue", name, in.Seq, pname, prevLast)
	case in.SourceAK != prev.fp:
		return reject(4, "%s's migrated-in record names source AK sha256:%x, but %s is signed by AK sha256:%x", name, in.SourceAK[:8], pname, prev.fp[:8])
	case mo.DestAK != l.fp:
		return reject(4, "%s's migrated-out record names destination AK sha256:%x, but %s is signed by AK sha256:%x", pname, mo.DestAK[:8], name, l.fp[:8])
	case in.SourceEpoch != prev.epochH:
		return reject(4, "%s's migrated-in record names source epoch sha256:%x, but %s is of epoch sha256:%x", name, in.SourceEpoch[:8], pname, prev.epochH[:8])
	}
	return nil
}

// marksOf returns the chain's segment marks (for a delta, the current
// segment's start comes from the checkpoint).
func marksOf(links []*link, cp *Checkpoint) []SegmentMark {
	out := make([]SegmentMark, len(links))
	for i, l := range links {
		m := SegmentMark{First: l.first, Host: l.host, AK: clone32(l.fp)}
		switch {
		case l.head != nil:
			m.Start = clone32(l.headH)
			if l.head.Kind == record.KindMigratedIn {
				m.Prev = clone32(l.head.MigratedIn.Prev)
			}
		case cp != nil && i < len(cp.Segments):
			m.Start, m.Prev = cp.Segments[i].Start, cp.Segments[i].Prev
		}
		if l.tail != nil && l.tail.Kind == record.KindMigratedOut {
			m.End = clone32(l.tailH)
		}
		if i < len(links)-1 {
			if b, err := l.ev.MarshalBinary(); err == nil {
				m.Evidence = clone32(sha256.Sum256(b))
			}
		}
		out[i] = m
	}
	return out
}

func clone32(d [32]byte) []byte { return append([]byte(nil), d[:]...) }

// checkSegments holds evidence to the segments the verifier's checkpoint
// saw: the same ones (no fork, no other history, none dropped), and for
// incremental evidence the very same earlier segments, verified then.
func checkSegments(cp *Checkpoint, marks []SegmentMark, links []*link) error {
	for k, cm := range cp.Segments[:min(len(cp.Segments), len(marks))] {
		if em := marks[k]; !bytes.Equal(cm.Start, em.Start) {
			if k > 0 && len(cm.Prev) > 0 && bytes.Equal(cm.Prev, em.Prev) {
				return reject(4, "fork: segment %d (host %q, AK sha256:%x) continues from the same migrated-out record as the segment %d the verifier saw before (host %q, AK sha256:%x): the VM was handed to two destinations", k, em.Host, em.AK[:8], k, cm.Host, cm.AK[:8])
			}
			return reject(4, "segment %d (host %q) is not the segment %d the verifier saw before (host %q): another history of this VM", k, em.Host, k, cm.Host)
		}
	}
	if len(marks) < len(cp.Segments) {
		last := cp.Segments[len(cp.Segments)-1]
		return reject(3, "rollback: the verifier saw %d segments of the VM's history (the last on host %q), the evidence shows %d: the later ones are missing", len(cp.Segments), last.Host, len(marks))
	}
	for k, cm := range cp.Segments {
		if len(cm.End) > 0 && !bytes.Equal(cm.End, marks[k].End) {
			return reject(4, "segment %d (host %q) ends otherwise than the verifier saw before: another history of this VM", k, marks[k].Host)
		}
	}
	if links[len(links)-1].delta {
		for k := range len(links) - 1 {
			if !bytes.Equal(cp.Segments[k].Evidence, marks[k].Evidence) {
				return reject(2, "incremental evidence whose segment %d is not the one the checkpoint verified: ask for full evidence", k)
			}
		}
	}
	return nil
}

// sameSegment reports whether the checkpoint's current segment is the
// one v verifies (the VM has not moved on since).
func (v *verification) sameSegment(cp *Checkpoint) bool {
	if len(cp.Segments) == 0 {
		return v.seg == 0
	}
	return len(cp.Segments) == v.seg+1
}

// where prefixes a rejection with the segment, for a chain.
func (v *verification) where() string {
	if v.chainLen <= 1 {
		return ""
	}
	return fmt.Sprintf("segment %d (host %q): ", v.seg, v.host)
}

// arrived checks a migrated-in record, record s of the segment: it opens
// the segment, names itself and the segment's epoch, is this VM's, and for
// a vTPM VM carries the vPCRs its earlier segments replay to.
func (v *verification) arrived(s uint64, in *record.MigratedIn) error {
	switch {
	case s != v.segFirst || v.segFirst == 0:
		return reject(4, "%srecord %d is a migrated-in record, which only opens a segment", v.where(), s)
	case in.Seq != s:
		return reject(4, "%smigrated-in record %d says it is record %d", v.where(), s, in.Seq)
	case in.Epoch != v.epochHash:
		return reject(4, "%smigrated-in record names epoch %x but the log is epoch %x: the VM's leaves were replanted in another epoch", v.where(), in.Epoch[:8], v.epochHash[:8])
	case in.UUID != v.ident.UUID || in.Instance != v.ident.Instance:
		return reject(4, "%sthe segment is another VM's: its migrated-in record is for uuid %s instance %x", v.where(), conceal.FormatUUID(in.UUID), in.Instance)
	}
	if v.vt == nil && in.VPCRs != nil && v.opts.LastSegmentOnly {
		// The earlier segments are taken as they are: so are the vPCRs
		// the VM arrived with, and this segment's events replay on them.
		vt, err := newVTPMTrackFrom(in.VTPMBanks, in.VPCRs)
		if err != nil {
			return reject(4, "%smigrated-in record %d: %v", v.where(), s, err)
		}
		v.vt = vt
		v.vt.taken = true
		v.rep.VM.Name = in.Name
		return nil
	}
	switch {
	case v.vt == nil && in.VPCRs != nil:
		return reject(4, "%smigrated-in record %d carries vPCRs but the VM's genesis declares no vTPM", v.where(), s)
	case v.vt == nil:
	case in.VPCRs == nil:
		return reject(4, "%sthe VM has a vTPM but its migrated-in record %d carries no vPCRs", v.where(), s)
	default:
		want, err1 := canon.Enc().Marshal(v.vt.state.Snapshot())
		got, err2 := canon.Enc().Marshal(in.VPCRs)
		if err1 != nil || err2 != nil || !bytes.Equal(want, got) {
			return reject(4, "%sthe vPCRs the VM arrived with (migrated-in record %d) are not the replay of its vTPM events on the earlier hosts: its vTPM state was altered in transit", v.where(), s)
		}
	}
	v.rep.VM.Name = in.Name
	return nil
}

// segmentReport describes the segment v verified.
func (v *verification) segmentReport(l *link) SegmentReport {
	n := v.s0 + uint64(len(v.tags))
	sr := SegmentReport{Index: v.seg, Host: v.epochRec.Host, AK: hex.EncodeToString(l.fp[:]), Epoch: hex.EncodeToString(v.epochHash[:]),
		Kind: v.ev.Kind, First: v.segFirst, Last: n - 1, Start: startOf(v.seg)}
	switch {
	case v.segEnd != nil:
		sr.End, sr.DestHost = record.KindMigratedOut.String(), v.segEnd.MigratedOut.DestHost
	case v.rep.Ended:
		sr.End = record.KindTeardown.String()
	}
	return sr
}
