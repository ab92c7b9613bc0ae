package mux

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Live migration (docs/protocol.md "Migration"). A VM keeps its identity
// (uuid, instance, K) from host to host; its history is a chain of
// segments, one per stay on a host. The source ends its segment with a
// migrated-out record and a final quote (MigrateOut); the destination
// opens the next one with a migrated-in record numbered one after it and
// carries the earlier segments' final evidence in every evidence of the
// VM (MigrateIn). A host the VM comes back to keeps its old, ended segment
// and opens a new one.

// EndedByMigration is VMInfo.EndedBy (and logstore.VM.EndedBy) of a VM
// whose segment on this host ended with a migrated-out record.
const EndedByMigration = "migrated-out"

// ErrNotMigrating reports a MigrateOut for a VM that ended otherwise, or a
// second MigrateOut to another destination.
var ErrNotMigrating = errors.New("vm did not migrate out")

// MigrateOut ends VM id's segment on this host for a live migration:
// it commits the migrated-out record out (durable and extended), takes the
// final quote over it as Teardown does, and returns the final evidence of
// the VM's whole chain so far (Previous included), which the destination
// passes to MigrateIn. The VM has ended here afterwards (EndedBy
// EndedByMigration); a Teardown after it changes nothing. Calling it again
// with the same destination and nonce (a handover retried after a crash)
// returns the same evidence; any other call for an ended VM fails.
func (m *Mux) MigrateOut(ctx context.Context, id conceal.Digest, out record.MigratedOut) (*evidence.Evidence, error) {
	r := &record.Record{Kind: record.KindMigratedOut, Time: m.cfg.Now().UnixNano(), MigratedOut: &out}
	raw, err := r.Marshal()
	if err != nil {
		return nil, fmt.Errorf("migrate out: %w", err)
	}
	t, err := m.enqueue(id, []*item{{r: raw, h: record.Hash(raw), kind: record.KindMigratedOut, reason: EndedByMigration}})
	if err == nil {
		_, err = t.Wait(ctx)
	} else if errors.Is(err, ErrEnded) || errors.Is(err, ErrUnknownVM) {
		err = m.sameMigration(id, &out)
	}
	if err != nil {
		return nil, fmt.Errorf("migrate out: %w", err)
	}
	kept := m.store.View(func(sn *logstore.Snapshot) error { _, err := sn.Final(id); return err }) == nil
	if !kept {
		if err := m.takeFinal(ctx, id); err != nil {
			return nil, fmt.Errorf("migrate out: %w", err)
		}
	}
	ev, err := m.FinalEvidence(id)
	if err != nil {
		return nil, fmt.Errorf("migrate out: %w", err)
	}
	return ev, nil
}

// sameMigration accepts a repeated MigrateOut: VM id's segment here ended
// with a migrated-out record to the same destination AK and nonce.
func (m *Mux) sameMigration(id conceal.Digest, out *record.MigratedOut) error {
	last, err := m.lastRecord(id)
	if err != nil {
		return fmt.Errorf("vm %x: %w", id[:8], ErrUnknownVM)
	}
	if last.Kind != record.KindMigratedOut {
		return fmt.Errorf("vm %x ended with a %s record: %w", id[:8], last.Kind, ErrNotMigrating)
	}
	if mo := last.MigratedOut; mo.DestAK != out.DestAK || mo.Nonce != out.Nonce {
		return fmt.Errorf("vm %x already migrated out to %s (AK sha256:%x), not to %s: %w", id[:8], mo.DestHost, mo.DestAK[:8], out.DestHost, ErrNotMigrating)
	}
	return nil
}

// lastRecord returns VM id's last durable record, if its segment here
// has ended (nothing can follow it then).
func (m *Mux) lastRecord(id conceal.Digest) (*record.Record, error) {
	var raw []byte
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		if !vm.Ended || vm.NextSeq == vm.FirstSeq {
			return fmt.Errorf("vm %s has not ended", vm.Name)
		}
		return sn.Records(id, vm.NextSeq-1, func(r *logstore.Record) error {
			raw = r.R
			return errStop
		})
	})
	if err != nil && err != errStop {
		return nil, err
	}
	return record.Unmarshal(raw)
}

// Arrival is what MigrateIn needs of a VM arriving by live migration.
type Arrival struct {
	// Identity is the VM's identity, unchanged from the source (uuid,
	// instance, K), as the handover delivered it.
	Identity *conceal.Identity
	// Launch is what the VM runs as here (name, vsock CID, domain XML
	// digest, launch files, vTPM banks); Launch.UUID must be the
	// identity's (zero: taken from it).
	Launch Launch
	// SourceHost and SourceAK name the source; SourceAK must be the AK
	// that signed Chain (the caller verified it with that key).
	SourceHost string
	SourceAK   *ecdsa.PublicKey
	// Chain is the final evidence MigrateOut returned on the source: the
	// source's segment, ended by a migrated-out record naming this host's
	// AK, and its Previous.
	Chain *evidence.Evidence
	// VPCRs are the vTPM's PCRs when the VM left the source (vTPM VMs
	// only; Launch.VTPMBanks then non-empty).
	VPCRs *vpcr.Snapshot
}

// MigrateIn opens VM a.Identity's segment on this host: it commits the
// migrated-in record, numbered one after the source's migrated-out record,
// with this host's epoch, the source's AK and epoch and the hash of the
// migrated-out record (durable and extended), and keeps a.Chain so that
// every evidence of the VM (fresh, incremental, final) carries the earlier
// segments as its Previous. The identity is the VM's own: the same id, and
// the same K locates and commits its records here. The caller has verified
// a.Chain with a.SourceAK (verify.Verify); MigrateIn checks that it ends
// with a migrated-out record to this host's AK, for this VM.
func (m *Mux) MigrateIn(ctx context.Context, a Arrival) (conceal.Digest, error) {
	ident, l := a.Identity, a.Launch
	if ident == nil || a.Chain == nil || a.SourceAK == nil {
		return conceal.Digest{}, errors.New("migrate in: identity, chain and source AK are required")
	}
	if l.UUID == ([16]byte{}) {
		l.UUID = ident.UUID
	}
	id := ident.ID()
	in, err := m.arrivalRecord(a, l)
	if err != nil {
		return conceal.Digest{}, fmt.Errorf("migrate in %s: %w", l.Name, err)
	}
	chain, err := evidence.EncodeChain(a.Chain.Chain())
	if err != nil {
		return conceal.Digest{}, fmt.Errorf("migrate in %s: %w", l.Name, err)
	}
	now := m.cfg.Now()
	rec := &record.Record{Kind: record.KindMigratedIn, Time: now.UnixNano(), MigratedIn: in}
	m.commitMu.Lock()
	epoch := m.epoch
	in.Epoch = record.EpochHash(m.epochRec)
	m.commitMu.Unlock()
	raw, err := rec.Marshal()
	if err != nil {
		return conceal.Digest{}, fmt.Errorf("migrate in %s: %w", l.Name, err)
	}
	if done, err := m.checkReturn(id, in); err != nil || done {
		if err != nil {
			return conceal.Digest{}, fmt.Errorf("migrate in %s: %w", l.Name, err)
		}
		return id, nil
	}
	vs := &vmState{
		vm: logstore.VM{ID: id, UUID: l.UUID, Instance: ident.Instance, Name: l.Name, CID: l.CID,
			Epoch: epoch, Created: now.UnixNano(), NextSeq: in.Seq, FirstSeq: in.Seq, Chain: chain},
		id:   id,
		keys: ident.Keys(),
	}
	if err := m.openVM(ctx, vs, ident.Key, raw, record.KindMigratedIn, "the vm is already live on this host"); err != nil {
		return conceal.Digest{}, fmt.Errorf("migrate in %s: %w", l.Name, err)
	}
	return id, nil
}

// arrivalRecord checks an arrival's chain and builds its migrated-in
// record (without the epoch, which the caller sets under the commit lock).
func (m *Mux) arrivalRecord(a Arrival, l Launch) (*record.MigratedIn, error) {
	ident, ch := a.Identity, a.Chain
	if l.UUID != ident.UUID {
		return nil, fmt.Errorf("launch uuid %s is not the identity's %s", conceal.FormatUUID(l.UUID), conceal.FormatUUID(ident.UUID))
	}
	if ch.Kind != evidence.KindFinal || ch.From != nil || len(ch.Records) == 0 {
		return nil, errors.New("the chain must be the source's final (post-mortem), full evidence")
	}
	if len(ch.Previous)+2 > evidence.MaxSegments+1 {
		return nil, fmt.Errorf("the vm's history has %d segments already; evidence carries at most %d previous ones", len(ch.Previous)+1, evidence.MaxSegments)
	}
	if ch.VM.UUID != conceal.FormatUUID(ident.UUID) || !bytes.Equal(ch.VM.Instance, ident.Instance[:]) {
		return nil, fmt.Errorf("the chain is vm %s instance %x's, not this identity's", ch.VM.UUID, []byte(ch.VM.Instance))
	}
	info, err := quote.Check(ch.Quote.Attest, ch.Quote.Signature, a.SourceAK)
	if err != nil {
		return nil, fmt.Errorf("the chain's final quote is not the source AK's (verify the chain with the source's enrolled AK first): %w", err)
	}
	first, err := record.Unmarshal(ch.Records[0].R)
	if err != nil {
		return nil, fmt.Errorf("the chain's first record: %w", err)
	}
	var s0 uint64
	switch first.Kind {
	case record.KindGenesis:
	case record.KindMigratedIn:
		s0 = first.MigratedIn.Seq
	default:
		return nil, fmt.Errorf("the chain's segment starts with a %s record, not genesis or migrated-in", first.Kind)
	}
	lastRaw := ch.Records[len(ch.Records)-1].R
	last, err := record.Unmarshal(lastRaw)
	if err != nil {
		return nil, fmt.Errorf("the chain's last record: %w", err)
	}
	if last.Kind != record.KindMigratedOut {
		return nil, fmt.Errorf("the chain ends with a %s record, not migrated-out", last.Kind)
	}
	if want := conceal.FinalData(ident.ID(), record.Hash(lastRaw)); !bytes.Equal(info.ExtraData, want[:]) {
		return nil, errors.New("the chain's final quote does not cover its migrated-out record for this vm")
	}
	if own := quote.AKFingerprint(m.tpm.AK()); last.MigratedOut.DestAK != own {
		return nil, fmt.Errorf("the source's migrated-out record names destination AK sha256:%x, not this host's sha256:%x", last.MigratedOut.DestAK[:8], own[:8])
	}
	if len(l.VTPMBanks) > 0 != (a.VPCRs != nil) {
		return nil, fmt.Errorf("a vTPM VM needs its vPCR snapshot and its banks (%d banks, snapshot %v)", len(l.VTPMBanks), a.VPCRs != nil)
	}
	return &record.MigratedIn{
		UUID: l.UUID, Name: l.Name, Instance: ident.Instance, CID: l.CID, DomainXML: l.DomainXML, Files: l.Files,
		Host: m.cfg.Host, VTPMBanks: l.VTPMBanks,
		SourceHost: a.SourceHost, SourceAK: quote.AKFingerprint(a.SourceAK), SourceEpoch: record.EpochHash(ch.Epoch.Record),
		Prev: record.Hash(lastRaw), Seq: s0 + uint64(len(ch.Records)), VPCRs: a.VPCRs,
	}, nil
}

// checkReturn refuses an arrival this host's own store contradicts: the
// VM is live here, or this host holds more of its history than the chain
// (an old chain replayed to roll it back). The very same arrival, already
// durable here (a handover retried after a crash), is done.
func (m *Mux) checkReturn(id conceal.Digest, in *record.MigratedIn) (done bool, err error) {
	epoch := m.epochOf() // not under the store's lock (logstore.Store.mu)
	err = m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if errors.Is(err, logstore.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if !vm.Ended && vm.FirstSeq == in.Seq && vm.Epoch == epoch {
			err := sn.Records(id, in.Seq, func(r *logstore.Record) error {
				if rec, err := record.Unmarshal(r.R); err == nil && rec.Kind == record.KindMigratedIn && rec.MigratedIn.Prev == in.Prev {
					done = true
				}
				return errStop
			})
			if err != nil && err != errStop {
				return err
			}
			if done {
				return nil
			}
		}
		if !vm.Ended {
			return fmt.Errorf("the vm is live on this host (epoch %d, %d records)", vm.Epoch, vm.NextSeq)
		}
		if vm.NextSeq > in.Seq {
			return fmt.Errorf("this host already holds the vm's records up to %d, the arrival would be record %d: an old chain", vm.NextSeq-1, in.Seq)
		}
		return nil
	})
	return done, err
}

// epochOf returns the current epoch's number.
func (m *Mux) epochOf() uint64 {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	return m.epoch
}

// VTPMStart returns the vPCRs VM id's vTPM started from on this host: the
// snapshot of its migrated-in record, or nil for a VM launched here. With
// TPMEvents (this segment's events) it is what a bridge restores the vTPM
// of a running VM from (vtpm.Config.Start, or Adopt).
func (m *Mux) VTPMStart(id conceal.Digest) (*vpcr.Snapshot, error) {
	var sn *vpcr.Snapshot
	err := m.store.View(func(s *logstore.Snapshot) error {
		vm, err := s.VM(id)
		if err != nil {
			return err
		}
		if vm.FirstSeq == 0 {
			return nil
		}
		return s.Records(id, vm.FirstSeq, func(r *logstore.Record) error {
			rec, err := record.Unmarshal(r.R)
			if err != nil {
				return fmt.Errorf("record %d: %w", r.Seq, err)
			}
			if rec.Kind != record.KindMigratedIn {
				return fmt.Errorf("record %d, the segment's first, is a %s record", r.Seq, rec.Kind)
			}
			sn = rec.MigratedIn.VPCRs
			return errStop
		})
	})
	if err != nil && err != errStop {
		return nil, fmt.Errorf("vtpm start of %x: %w", id[:6], err)
	}
	return sn, nil
}

// SegmentInfo describes one of a VM's segments on this host.
type SegmentInfo struct {
	FirstSeq uint64 // the segment's first record number
	NextSeq  uint64 // one after its last durable record
	Epoch    uint64
	Ended    bool
	EndedBy  string
	Final    bool // a final quote is kept
}

// Segments lists VM id's segments on this host, oldest first: earlier
// ones it left by live migration and the current one.
func (m *Mux) Segments(id conceal.Digest) ([]SegmentInfo, error) {
	var out []SegmentInfo
	err := m.store.View(func(sn *logstore.Snapshot) error {
		if err := sn.Segments(id, func(s *logstore.Segment) error {
			out = append(out, SegmentInfo{FirstSeq: s.VM.FirstSeq, NextSeq: s.VM.NextSeq, Epoch: s.VM.Epoch, Ended: s.VM.Ended, EndedBy: s.VM.EndedBy, Final: s.Final != nil})
			return nil
		}); err != nil {
			return err
		}
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		_, ferr := sn.Final(id)
		out = append(out, SegmentInfo{FirstSeq: vm.FirstSeq, NextSeq: vm.NextSeq, Epoch: vm.Epoch, Ended: vm.Ended, EndedBy: vm.EndedBy, Final: ferr == nil})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("segments of %x: %w", id[:6], err)
	}
	return out, nil
}
