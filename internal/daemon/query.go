package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// Status reports the bridge's state.
func (d controlHandler) Status(ctx context.Context) (*control.Status, error) {
	st := d.mux.Status()
	out := &control.Status{
		Version: d.opts.Version, Host: d.host, TPM: d.tpmName(), Started: d.started,
		Epoch: st.Epoch, Batches: st.Batches, Entries: st.Entries, PCR: st.PCR,
		PCRValue: hex.EncodeToString(st.PCRValue[:]), HostPCRs: d.set.hostPCRs,
		LiveVMs: st.LiveVMs, Queued: st.Queued, Fault: st.Fault,
		Records: st.Stats.Records, Extends: st.Stats.Extends, Quotes: st.Stats.Quotes, MaxBatch: st.Stats.MaxBatch,
		Sessions: d.sessions.Load(), Refused: d.refusedTotal(),
		Vsock: d.vsockOn, VsockNote: d.vsockNote, ControlSocket: d.cfg.ControlSocket, SerialDir: d.cfg.SerialDir,
		Metrics: d.MetricsAddr(), Mode: d.cfg.Hook.Mode, Migration: d.migrationStatus(),
	}
	d.mu.Lock()
	for _, e := range d.vms {
		out.Listeners += len(e.listenerInfo())
	}
	d.mu.Unlock()
	return out, nil
}

// VMs lists the live VM instances, or with all every instance the store
// holds.
func (d controlHandler) VMs(ctx context.Context, all bool) ([]control.VM, error) {
	infos, err := d.mux.VMs()
	if err != nil {
		return nil, err
	}
	epoch := d.mux.Status().Epoch
	out := []control.VM{} // [] in JSON, not null, when there is none
	for _, v := range infos {
		live := v.Live
		if !live && !all {
			continue
		}
		vm := control.VM{Name: v.Name, UUID: conceal.FormatUUID(v.UUID), Instance: hex.EncodeToString(v.Instance[:]),
			ID: hex.EncodeToString(v.ID[:]), CID: v.CID, Epoch: v.Epoch, Records: v.Records, Live: live, EndedBy: v.EndedBy}
		if !v.Ended && v.Epoch != epoch {
			vm.EndedBy = "epoch-ended"
		}
		if live {
			if e := d.entry(v.Name); e != nil && e.id == v.ID {
				vm.Listeners = e.listenerInfo()
				vm.Sessions = e.sessionCount()
				if cid := e.getCID(); cid != 0 {
					vm.CID = cid
				}
			}
			vm.Warning = transportWarning(vm.Listeners)
		}
		out = append(out, vm)
	}
	return out, nil
}

// Evidence returns evidence for a VM: for a live instance a fresh quote
// over the nonce; for an ended one the post-mortem quote the bridge kept at
// its teardown. vm is a name, uuid, instance or id, or a unique prefix of
// an instance or id (resolve).
func (d controlHandler) Evidence(ctx context.Context, vm string, nonce []byte) (out *control.Evidence, err error) {
	defer d.count(control.OpEvidence, &err)
	if vm == "" {
		return nil, errors.New("no vm named: " + resolveHint)
	}
	id, live, err := d.resolve(vm)
	if err != nil {
		return nil, err // the CLI and the log name the op already
	}
	out = &control.Evidence{VM: vm}
	var raw []byte
	if live {
		if len(nonce) == 0 || len(nonce) > 64 {
			return nil, fmt.Errorf("nonce of %d bytes, want 1 to 64", len(nonce))
		}
		ev, err := d.mux.Evidence(ctx, id, nonce)
		if err != nil {
			return nil, err
		}
		if raw, err = ev.MarshalBinary(); err != nil {
			return nil, err
		}
		out.VM = ev.VM.Name
	} else {
		ev, err := d.mux.FinalEvidence(id)
		if err != nil {
			return nil, err
		}
		if raw, err = ev.MarshalBinary(); err != nil {
			return nil, err
		}
		out.VM, out.PostMortem = ev.VM.Name, true
	}
	ident, err := d.mux.Identity(id)
	if err != nil {
		return nil, err
	}
	pemBytes, err := tpm.AKPEM(d.mux.AK())
	if err != nil {
		return nil, err
	}
	out.Evidence, out.Identity, out.AKPEM = raw, *ident, string(pemBytes)
	return out, nil
}
