package mux

import (
	"context"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// TPMEvents returns VM id's vTPM event records, in order: the journal a
// bridge-served vTPM is restored from after a bridge restart, so a running
// guest finds its vPCRs exactly as they were.
func (m *Mux) TPMEvents(id conceal.Digest) ([]vpcr.Event, error) {
	var out []vpcr.Event
	err := m.store.View(func(sn *logstore.Snapshot) error {
		return sn.Records(id, 0, func(r *logstore.Record) error {
			rec, err := record.Unmarshal(r.R)
			if err != nil {
				return fmt.Errorf("record %d: %w", r.Seq, err)
			}
			if rec.Kind != record.KindTPM {
				return nil
			}
			e, err := rec.TPM.Event()
			if err != nil {
				return fmt.Errorf("record %d: %w", r.Seq, err)
			}
			out = append(out, e)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("vtpm events of %x: %w", id[:6], err)
	}
	return out, nil
}

// Journal is the vTPM journal of one VM (vtpm.Journal): each event becomes
// a record in the VM's concealed log through the group commit, and Append
// returns once the record is durable and extended into the host TPM
// (mode anchored), so the guest kernel's measurement is anchored before its
// command returns.
type Journal struct {
	m  *Mux
	id conceal.Digest
}

// Journal returns VM id's vTPM journal.
func (m *Mux) Journal(id conceal.Digest) *Journal { return &Journal{m: m, id: id} }

// Append implements vtpm.Journal.
func (j *Journal) Append(ctx context.Context, e vpcr.Event) error {
	_, err := j.m.Append(ctx, j.id, record.NewTPM(e, j.m.cfg.Now().UnixNano()))
	if err != nil {
		return fmt.Errorf("journal vtpm event %v: %w", e, err)
	}
	return nil
}
