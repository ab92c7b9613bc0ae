package mux

import (
	"context"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// TPMEvents returns VM id's vTPM event records of its segment on this
// host, in order: the journal a bridge-served vTPM is restored from after
// a bridge restart, so a running guest finds its vPCRs exactly as they
// were. For a VM that arrived by live migration they apply on top of
// VTPMStart's snapshot.
func (m *Mux) TPMEvents(id conceal.Digest) ([]vpcr.Event, error) {
	m.syncVM(id) // every durable event, staged ones included
	var out []vpcr.Event
	err := m.store.View(func(sn *logstore.Snapshot) error {
		vm, err := sn.VM(id)
		if err != nil {
			return err
		}
		return sn.Records(id, vm.FirstSeq, func(r *logstore.Record) error {
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
// a record in the VM's concealed log through the group commit. Append
// returns once the record is durable in the log store (mode durable, the
// default), or durable and extended into the host TPM (mode anchored), so
// the guest kernel's measurement is kept before the measured file is used.
type Journal struct {
	m        *Mux
	id       conceal.Digest
	anchored bool
}

// Journal returns VM id's vTPM journal; anchored selects mode anchored.
func (m *Mux) Journal(id conceal.Digest, anchored bool) *Journal {
	return &Journal{m: m, id: id, anchored: anchored}
}

// healPoll is how often an anchored Append whose extend failed checks that
// the multiplexer healed (re-extended the batch).
const healPoll = 50 * time.Millisecond

// Append implements vtpm.Journal. It returns an error only when the event
// was not recorded (the vTPM then answers the guest TPM_RC_RETRY and
// changes nothing). Once the record is durable it returns nil: in mode
// anchored after the extend, or, if the extend failed, after the
// multiplexer healed (it re-extends the durable batch) or ctx ended (the
// record is durable; the next start extends it).
func (j *Journal) Append(ctx context.Context, e vpcr.Event) error {
	w := waitDurable
	if j.anchored {
		w = waitExtend
	}
	t, err := j.m.submit(j.id, w, record.NewTPM(e, j.m.cfg.Now().UnixNano()))
	if err != nil {
		return fmt.Errorf("journal vtpm event %v: %w", e, err)
	}
	durable, err := t.WaitDurable(ctx)
	if !durable {
		if ctx.Err() != nil {
			// Not known whether it landed: wait for the committer, which
			// does not take long, rather than guess.
			durable, err = t.WaitDurable(context.Background())
		}
		if !durable {
			return fmt.Errorf("journal vtpm event %v: %w", e, err)
		}
	}
	if !j.anchored {
		return nil
	}
	if err := t.WaitExtended(ctx); err == nil {
		return nil
	}
	for ctx.Err() == nil && j.m.Status().Fault != "" {
		select {
		case <-ctx.Done():
		case <-time.After(healPoll):
		}
	}
	return nil
}
