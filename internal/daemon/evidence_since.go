package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// WriteEvidence serves the control socket's evidence requests
// (control.EvidenceWriter): for a live instance, full evidence or, with
// since, the delta after a verifier's checkpoint, built and written while
// the multiplexer's evidence budget holds it; for an ended instance the
// post-mortem evidence (Evidence), which has no delta.
func (d *Daemon) WriteEvidence(ctx context.Context, vm string, nonce []byte, since *evidence.Since, write func(*control.Evidence) error) error {
	if vm == "" {
		return errors.New("evidence: no vm named")
	}
	id, live, err := d.resolve(vm)
	if err != nil {
		return fmt.Errorf("evidence: %w", err)
	}
	if !live {
		if since != nil {
			return fmt.Errorf("evidence: %s has ended: its post-mortem evidence has no delta; ask for it in full", vm)
		}
		out, err := d.Evidence(ctx, vm, nonce)
		if err != nil {
			return err
		}
		return write(out)
	}
	defer d.count(control.OpEvidence, &err)
	ident, err := d.mux.Identity(id)
	if err != nil {
		return err
	}
	pemBytes, err := tpm.AKPEM(d.mux.AK())
	if err != nil {
		return err
	}
	err = d.mux.WithEvidence(ctx, id, nonce, since, func(ev *evidence.Evidence) error {
		raw, err := ev.MarshalBinary()
		if err != nil {
			return err
		}
		return write(&control.Evidence{VM: ev.VM.Name, Evidence: raw, Identity: *ident, AKPEM: string(pemBytes)})
	})
	return err
}
