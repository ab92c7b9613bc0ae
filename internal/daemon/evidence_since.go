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
// since, the delta after a verifier's checkpoint, streamed from the store
// (mux.StreamEvidence) so that a large log is never held in memory; for an
// ended instance the post-mortem evidence, streamed alike
// (mux.StreamFinalEvidence), which has no delta.
func (d controlHandler) WriteEvidence(ctx context.Context, vm string, nonce []byte, since *evidence.Since, write func(*control.Evidence, func(emit func([]byte) error) error) error) (err error) {
	if vm == "" {
		return errors.New("no vm named: " + resolveHint)
	}
	id, live, err := d.resolve(vm)
	if err != nil {
		return err // the CLI and the log name the op already
	}
	defer d.count(control.OpEvidence, &err)
	if !live && since != nil {
		return fmt.Errorf("%s has ended: its post-mortem evidence has no delta; ask for it in full", vm)
	}
	if live && (len(nonce) == 0 || len(nonce) > 64) {
		return fmt.Errorf("nonce of %d bytes, want 1 to 64", len(nonce))
	}
	ident, err := d.mux.Identity(id)
	if err != nil {
		return err
	}
	info, err := d.mux.Info(id)
	if err != nil {
		return err
	}
	pemBytes, err := tpm.AKPEM(d.mux.AK())
	if err != nil {
		return err
	}
	if !live {
		// The post-mortem evidence: the final quote kept at teardown.
		return write(&control.Evidence{VM: info.Name, Identity: *ident, AKPEM: string(pemBytes), PostMortem: true}, func(emit func([]byte) error) error {
			return d.mux.StreamFinalEvidence(ctx, id, evidenceChunk, func(p []byte, _ bool) error { return emit(p) })
		})
	}
	return write(&control.Evidence{VM: info.Name, Identity: *ident, AKPEM: string(pemBytes)}, func(emit func([]byte) error) error {
		return d.mux.StreamEvidence(ctx, id, nonce, since, evidenceChunk, func(p []byte, _ bool) error { return emit(p) })
	})
}

// evidenceChunk is the piece size evidence is streamed in.
const evidenceChunk = 1 << 20
