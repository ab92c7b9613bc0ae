package mux

import (
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
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

// Guest returns VM id's guest state.
func (m *Mux) Guest(id conceal.Digest) (GuestState, error) {
	var gs GuestState
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		gs.Ended = vm.Ended
		var derr error
		err = sn.LastRecords(id, func(r *logstore.Record) bool {
			rec, err := record.Unmarshal(r.R)
			if err != nil {
				derr = fmt.Errorf("record %d: %w", r.Seq, err)
				return false
			}
			switch rec.Kind {
			case record.KindMeasurement:
				gs.BootID, gs.Next = rec.Measurement.BootID, rec.Measurement.LogIndex+1
				return false
			case record.KindReboot:
				gs.BootID, gs.Next = rec.Reboot.BootID, 0
				return false
			case record.KindGenesis:
				return false
			}
			return true
		})
		if err != nil {
			return err
		}
		return derr
	})
	if err != nil {
		return GuestState{}, fmt.Errorf("guest state: %w", err)
	}
	return gs, nil
}
