package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/libvirt"
	"github.com/tpmmux/tpmmux/qemu"
)

// HOOK POINT: reconciliation with libvirtd.
//
// The daemon itself never calls the libvirt API. Options.Libvirt plugs in
// whatever keeps the bridge in step with libvirtd; it gets the Daemon,
// whose LibvirtHost (below) is a libvirt.Host, so the libvirt package's
// Follow(target, d.LibvirtHost(), log) fits as is (cmd/tpmmux-bridge does that when
// the configuration's "libvirt" key is set): on every (re)connection it
// reconciles the running domains with the live identities (identities
// whose domain is gone get a teardown with reason "missed-stop"), and it
// records guest resets.

// LiveVMs lists the VM instances whose identity is live (libvirt.Host).
func (d libvirtHost) LiveVMs() ([]libvirt.KnownVM, error) {
	infos, err := d.mux.LiveVMs()
	if err != nil {
		return nil, err
	}
	var out []libvirt.KnownVM
	for _, v := range infos {
		out = append(out, libvirt.KnownVM{ID: v.ID, Name: v.Name, UUID: v.UUID})
	}
	return out, nil
}

// Teardown ends VM instance vm.ID with reason and closes its listeners
// (libvirt.Host). An instance that has ended already is done.
func (d libvirtHost) Teardown(ctx context.Context, vm libvirt.KnownVM, reason string) error {
	unlock := d.names.Lock(vm.Name)
	defer unlock()
	if d.mig != nil && d.mig.Reserved(vm.Name) {
		// Gone from libvirt while reserved for a destination (the bridge
		// missed the stop, e.g. it was down): it migrated; the handover,
		// which the destination waits for, ends it.
		d.log.Info("libvirt: a VM reserved for migration is not running here: handing it over", "vm", vm.Name)
		return d.migratedOut(vm.Name, vm.ID)
	}
	d.stops.drop(vm.Name, vm.ID)
	if e := d.entry(vm.Name); e != nil && e.id == vm.ID {
		d.closeEntry(e, true)
	}
	if _, err := d.mux.Teardown(ctx, vm.ID, reason); err != nil && !errors.Is(err, mux.ErrEnded) {
		return err
	}
	d.states.remove(vm.ID)
	return nil
}

// Reset records that the host saw vm's guest reset (libvirt.Host).
func (d libvirtHost) Reset(ctx context.Context, vm libvirt.KnownVM) error {
	_, err := d.mux.Append(ctx, vm.ID, libvirt.RebootRecord(time.Now()))
	if errors.Is(err, mux.ErrEnded) || errors.Is(err, mux.ErrUnknownVM) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reset of %s: %w", vm.Name, err)
	}
	return nil
}

// LibvirtHost is the daemon as libvirt.Follow's host: reconciliation,
// resets, and the check of a started VM over QMP. (The daemon's own Started
// serves the hook's "started begin"; this one runs on libvirt's started
// event, after the hook has returned, because libvirtd holds the domain's
// job while a hook runs and a monitor command from inside it would wait for
// itself.)
func (d *Daemon) LibvirtHost() libvirt.StartHost { return libvirtHost{d} }

// libvirtHost is the daemon as libvirt's Host, StartHost and StopHost: it
// keeps those methods off the Daemon's own API.
type libvirtHost struct{ *Daemon }

var (
	_ libvirt.StartHost  = libvirtHost{}
	_ libvirt.StopHost   = libvirtHost{}
	_ libvirt.ResumeHost = libvirtHost{}
)

// Resumed takes libvirt's resumed event: on the source of a live
// migration, a VM reserved for a destination that resumes here stays here
// (the migration failed or was aborted), so the reservation is dropped and
// the VM's history goes on on this host.
func (h libvirtHost) Resumed(ctx context.Context, name string, uuid [16]byte, detail string) {
	if h.mig != nil && h.mig.SourceResumed(name) {
		h.log.Info("migration aborted: the VM resumed on this host, which keeps its identity", "vm", name, "detail", detail)
	}
}

// Stopped takes libvirt's stopped event: its detail (shutdown, destroyed,
// crashed, …) is the teardown reason of a released VM waiting for it.
func (h libvirtHost) Stopped(ctx context.Context, name string, uuid [16]byte, detail string) {
	h.stops.event(name, detail)
}

// Started checks, in the background, that the running QEMU's vsock
// guest-cid is the CID the domain XML named (and that there is no vsock
// device when it named none). A mismatch means the peer-CID check of the
// VM's vsock listener would admit another VM's connections: the bridge
// records an action record in the VM's log and logs an error.
func (h libvirtHost) Started(ctx context.Context, vm libvirt.KnownVM, c *libvirt.Client) {
	info, err := h.mux.Info(vm.ID)
	if err != nil {
		h.log.Warn("qmp check: read the vm", "vm", vm.Name, "err", err)
		return
	}
	want := info.CID
	if e := h.entry(vm.Name); e != nil && e.id == vm.ID {
		// An auto-assigned CID is known only from the live XML ("started").
		if cid := e.getCID(); cid != 0 {
			want = cid
		}
	}
	go func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		mon, err := qemu.NewLibvirtMonitor(cctx, c.Libvirt(), vm.UUID)
		if err != nil {
			h.log.Warn("qmp check: cannot reach the running qemu", "vm", vm.Name, "err", err)
			return
		}
		defer mon.Close()
		err = qemu.CheckCID(cctx, mon, want)
		if reportCIDCheck(h.log, vm.Name, want, err) {
			r := &record.Record{Kind: record.KindAction, Time: time.Now().UnixNano(), Action: &record.Action{Action: "cid-mismatch", Detail: err.Error()}}
			if _, aerr := h.mux.Append(cctx, vm.ID, r); aerr != nil {
				h.log.Error("qmp check: record the mismatch", "vm", vm.Name, "err", aerr)
			}
		}
	}()
}

// reportCIDCheck logs the outcome err of the QMP check that VM name's
// vsock CID is want (0: the domain XML names no vsock device), and reports
// whether it found a mismatch.
func reportCIDCheck(log *slog.Logger, name string, want uint32, err error) (mismatch bool) {
	var mm *qemu.CIDMismatchError
	switch {
	case err == nil && want == 0:
		log.Info("qmp check: no vsock device, as the domain XML says", "vm", name)
	case err == nil:
		log.Info("qmp check: vsock guest-cid matches the domain XML", "vm", name, "cid", want)
	case errors.As(err, &mm):
		log.Error("qmp check: the running VM's vsock guest-cid is not the domain XML's", "vm", name, "err", err)
		return true
	default:
		log.Warn("qmp check failed", "vm", name, "err", err)
	}
	return false
}
