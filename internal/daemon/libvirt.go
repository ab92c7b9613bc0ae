package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/libvirt"
)

// HOOK POINT: reconciliation with libvirtd.
//
// The daemon itself never calls the libvirt API. Options.Libvirt plugs in
// whatever keeps the bridge in step with libvirtd; it gets the Daemon,
// which implements libvirt.Host (below), so the libvirt package's
// Follow(target, host, log) fits as is (cmd/tpmmux-bridge does that when
// the configuration's "libvirt" key is set): on every (re)connection it
// reconciles the running domains with the live identities (identities
// whose domain is gone get a teardown with reason "missed-stop"), and it
// records guest resets.

var _ libvirt.Host = (*Daemon)(nil)

// LiveVMs lists the VM instances whose identity is live (libvirt.Host).
func (d *Daemon) LiveVMs() ([]libvirt.KnownVM, error) {
	infos, err := d.mux.VMs()
	if err != nil {
		return nil, err
	}
	epoch := d.mux.Status().Epoch
	var out []libvirt.KnownVM
	for _, v := range infos {
		if v.Ended || v.Epoch != epoch {
			continue
		}
		if id, ok := d.mux.Lookup(v.Name); !ok || id != v.ID {
			continue
		}
		out = append(out, libvirt.KnownVM{ID: v.ID, Name: v.Name, UUID: v.UUID})
	}
	return out, nil
}

// Teardown ends VM instance vm.ID with reason and closes its listeners
// (libvirt.Host). An instance that has ended already is done.
func (d *Daemon) Teardown(ctx context.Context, vm libvirt.KnownVM, reason string) error {
	unlock := d.names.Lock(vm.Name)
	defer unlock()
	d.mu.Lock()
	if p := d.pending[vm.Name]; p != nil && p.id == vm.ID {
		p.timer.Stop()
		delete(d.pending, vm.Name)
	}
	d.mu.Unlock()
	if e := d.entry(vm.Name); e != nil && e.id == vm.ID {
		d.closeEntry(e, true)
	}
	if _, err := d.mux.Teardown(ctx, vm.ID, reason); err != nil && !errors.Is(err, mux.ErrEnded) {
		return err
	}
	d.removeState(vm.ID)
	return nil
}

// Reset records that the host saw vm's guest reset (libvirt.Host).
func (d *Daemon) Reset(ctx context.Context, vm libvirt.KnownVM) error {
	_, err := d.mux.Append(ctx, vm.ID, libvirt.RebootRecord(time.Now()))
	if errors.Is(err, mux.ErrEnded) || errors.Is(err, mux.ErrUnknownVM) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reset of %s: %w", vm.Name, err)
	}
	return nil
}
