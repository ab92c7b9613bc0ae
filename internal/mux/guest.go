package mux

import (
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
)

// GuestState is where a VM's guest IMA stream stands in the durable log:
// the guest boot id of the newest measurement or reboot record and the next
// IMA log index the bridge needs for that boot. It is derived from the
// durable records themselves, so it can never disagree with them.
type GuestState struct {
	BootID string
	Next   uint64
	Ended  bool
}

// Guest returns VM id's guest state. For a VM that came by live migration
// and has no guest record on this host yet, it is where the stream stood
// when the VM left its previous host (its records in the chain), so the
// agent resumes on the destination with no lost or doubled entries.
func (m *Mux) Guest(id conceal.Digest) (GuestState, error) {
	m.syncVM(id) // the durable records, staged ones included
	var gs GuestState
	var chain []byte
	found := false
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		gs.Ended = vm.Ended
		var derr error
		err = sn.LastRecords(id, func(r *logstore.Record) bool {
			if r.Seq < vm.FirstSeq {
				return false // an earlier segment on this host, not the one before this
			}
			rec, err := record.Unmarshal(r.R)
			if err != nil {
				derr = fmt.Errorf("record %d: %w", r.Seq, err)
				return false
			}
			var stop bool
			found, stop = guestRecord(rec, &gs)
			return !stop
		})
		if err != nil {
			return err
		}
		if !found && vm.FirstSeq > 0 {
			chain = vm.Chain
		}
		return derr
	})
	if err == nil && chain != nil {
		err = guestFromChain(chain, &gs)
	}
	if err != nil {
		return GuestState{}, fmt.Errorf("guest state: %w", err)
	}
	return gs, nil
}

// guestRecord folds rec, read newest first, into gs: found says it was a
// guest record, stop that the search ends (found, or the segment's start).
func guestRecord(rec *record.Record, gs *GuestState) (found, stop bool) {
	switch rec.Kind {
	case record.KindMeasurement:
		gs.BootID, gs.Next = rec.Measurement.BootID, rec.Measurement.LogIndex+1
		return true, true
	case record.KindReboot:
		gs.BootID, gs.Next = rec.Reboot.BootID, 0
		return true, true
	case record.KindGenesis, record.KindMigratedIn:
		return false, true
	}
	return false, false
}

// guestFromChain finds the guest state in the earlier segments, newest
// first.
func guestFromChain(raw []byte, gs *GuestState) error {
	chain, err := evidence.DecodeChain(raw)
	if err != nil {
		return err
	}
	for i := len(chain) - 1; i >= 0; i-- {
		recs := chain[i].Records
		for j := len(recs) - 1; j >= 0; j-- {
			rec, err := record.Unmarshal(recs[j].R)
			if err != nil {
				return fmt.Errorf("segment %d: %w", i, err)
			}
			if found, stop := guestRecord(rec, gs); found || stop && rec.Kind == record.KindGenesis {
				return nil
			}
		}
	}
	return nil
}
