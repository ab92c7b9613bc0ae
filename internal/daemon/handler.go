package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/libvirt"
)

// lifecycleTimeout bounds a teardown the bridge carries out on its own
// (after "stopped end", or after the hook stopped waiting): it must not
// depend on the hook's patience.
const lifecycleTimeout = 30 * time.Second

// controlHandler is the daemon as the control socket's handler: the
// hook's lifecycle calls and the operator's queries (control.Handler,
// control.Undoer, control.EnrollHandler, control.ViolationHandler). It
// keeps those methods off the Daemon's own API.
type controlHandler struct{ *Daemon }

var _ control.Handler = controlHandler{}
var _ control.Undoer = controlHandler{}
var _ control.EvidenceWriter = controlHandler{}

// ControlHandler is the daemon as a control.Handler, the methods the
// control socket serves, for callers in the same process (benchmarks).
func (d *Daemon) ControlHandler() control.Handler { return controlHandler{d} }

// wanted says whether the domain gets an identity under the bridge's mode.
func (d *Daemon) wanted(dom *libvirt.Domain) (bool, string) {
	return dom.Attested(d.cfg.Hook.Mode)
}

func skipped(dom *libvirt.Domain, note string) *control.VM {
	return &control.VM{Name: dom.Name, UUID: conceal.FormatUUID(dom.UUID), Skipped: true, Note: note}
}

func (d *Daemon) count(op string, err *error) {
	res := "ok"
	if *err != nil {
		res = "error"
	}
	d.metrics.controlReqs.WithLabelValues(op, res).Inc()
}

// Prepare handles "prepare begin": the VM's listeners are opened (the
// virtio-serial socket must exist before QEMU starts, since QEMU connects
// to it), then the bridge measures the launch and gives the VM its identity
// and genesis record, then the listeners start serving it.
func (d controlHandler) Prepare(ctx context.Context, xml []byte, failOpen bool) (vm *control.VM, err error) {
	defer d.count(control.OpPrepare, &err)
	dom, err := libvirt.ParseDomain(xml)
	if err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	if ok, why := d.wanted(dom); !ok {
		d.log.Info("vm not attested", "vm", dom.Name, "why", why)
		return skipped(dom, why), nil
	}
	vm, err = d.prepare(ctx, dom, xml)
	if err != nil && d.cfg.Hook.FailOpen {
		d.log.Error("prepare failed; the domain starts unattested (hook.fail_open)", "vm", dom.Name, "err", err)
		return skipped(dom, "prepare failed (fail_open): "+err.Error()), nil
	}
	return vm, err
}

func (d *Daemon) prepare(ctx context.Context, dom *libvirt.Domain, xml []byte) (*control.VM, error) {
	unlock := d.names.Lock(dom.Name)
	defer unlock()
	// A teardown still waiting for "release end" belongs to the previous
	// instance: record it now.
	d.stops.finish(dom.Name)
	plan, err := d.planFor(dom)
	if err != nil {
		return nil, err
	}
	if !d.reachable(dom, plan) {
		if d.cfg.Hook.RequireTransport {
			return nil, fmt.Errorf("domain %s: %s; add the org.tpmmux.0 channel (docs/hook.md) or a <vsock> device on a host with vsock, or unset hook.require_transport", dom.Name, noTransport)
		}
		d.log.Warn("vm gets an identity that no guest transport reaches: add the org.tpmmux.0 channel (docs/hook.md), or set hook.require_transport to refuse such domains",
			"vm", dom.Name, "serial_channel", false, "vsock_device", dom.Vsock, "vsock_on_host", d.vsockOn)
	}
	if old := d.entry(dom.Name); old != nil {
		// A previous instance whose stop the bridge missed: bridge.Prepare
		// tears it down; its listeners go first (same socket path).
		d.closeEntry(old, true)
		d.states.remove(old.id)
	}
	if in := d.incomingOf(dom.Name); in != nil {
		// A prepare retried by libvirt for the same incoming VM.
		d.dropIncoming(in, false)
	}
	if d.mig != nil && d.mig.Pending(dom.UUID) {
		// Migrating in: sockets only, the identity comes with the handover.
		return d.prepareIncoming(dom, xml, plan)
	}
	e := d.newEntry(dom.Name, conceal.Digest{}, dom.UUID)
	ls, err := d.listen(e, plan)
	if err != nil {
		return nil, fmt.Errorf("prepare %s: %w", dom.Name, err)
	}
	// The vTPM socket must exist before QEMU starts: QEMU's TPM emulator
	// connects once, at start, and a domain without it does not start.
	var vl *net.UnixListener
	if plan.vtpm != "" {
		if vl, err = d.listenVTPM(plan.vtpm); err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, fmt.Errorf("prepare %s: %w", dom.Name, err)
		}
	}
	closeAll := func() {
		for _, l := range ls {
			l.Close()
		}
		if vl != nil {
			vl.Close()
		}
	}
	// The listeners accept only once the identity exists; until then
	// connections wait in the backlog (QEMU has not started yet anyway).
	_, ident, err := d.br.Prepare(ctx, xml)
	if err != nil {
		closeAll()
		// NewVM may have made the genesis durable after ctx ended.
		if id, ok := d.mux.Lookup(dom.Name); ok {
			tctx, cancel := context.WithTimeout(context.Background(), lifecycleTimeout)
			d.mux.Teardown(tctx, id, "start-failed")
			cancel()
		}
		return nil, err
	}
	e.id = ident.ID()
	if err := d.register(e); err != nil {
		closeAll()
		return nil, err
	}
	if err := d.serveListeners(e, ls); err != nil {
		return nil, err
	}
	if vl != nil {
		if err := d.serveVTPM(e, plan.vtpm, vl, nil); err != nil {
			return nil, err
		}
	}
	d.saveState(e)
	return d.vmInfo(e, ident), nil
}

func (d *Daemon) vmInfo(e *vmEntry, ident *conceal.Identity) *control.VM {
	vm := &control.VM{Name: e.name, UUID: conceal.FormatUUID(e.uuid), ID: hex.EncodeToString(e.id[:]), CID: e.getCID(),
		Live: true, Listeners: e.listenerInfo(), Sessions: e.sessionCount(), Epoch: d.mux.Status().Epoch}
	vm.Warning = transportWarning(vm.Listeners)
	if ident != nil {
		vm.Instance = hex.EncodeToString(ident.Instance[:])
	}
	if n, err := d.mux.NextSeq(e.id); err == nil {
		vm.Records = n
	}
	return vm
}

// UndoPrepare ends an instance whose prepare answer never reached a
// fail-closed hook: libvirt aborts that start.
func (d controlHandler) UndoPrepare(ctx context.Context, vm *control.VM, cause error) {
	unlock := d.names.Lock(vm.Name)
	defer unlock()
	e := d.entry(vm.Name)
	if e == nil || hex.EncodeToString(e.id[:]) != vm.ID {
		return
	}
	d.log.Warn("the hook stopped waiting for prepare: libvirt aborts this start, so the identity is ended", "vm", vm.Name, "err", cause)
	d.closeEntry(e, true)
	if _, err := d.mux.Teardown(ctx, e.id, "start-aborted"); err != nil {
		d.log.Error("teardown after an aborted start", "vm", vm.Name, "err", err)
	}
	d.states.remove(e.id)
}

// liveEntry returns the entry of the live instance named name, adopting
// one the store has but the daemon does not serve (no listeners yet).
func (d *Daemon) liveEntry(name string, uuid *[16]byte) (*vmEntry, error) {
	id, ok := d.mux.Lookup(name)
	if !ok {
		return nil, fmt.Errorf("vm %s has no live identity (was it started while the bridge was down, or opted out?)", name)
	}
	if uuid != nil {
		ident, err := d.mux.Identity(id)
		if err != nil {
			return nil, err
		}
		if ident.UUID != *uuid {
			return nil, fmt.Errorf("vm %s: the live identity belongs to domain uuid %s, not %s", name, conceal.FormatUUID(ident.UUID), conceal.FormatUUID(*uuid))
		}
	}
	if e := d.entry(name); e != nil && e.id == id {
		return e, nil
	} else if e != nil {
		d.closeEntry(e, true)
	}
	ident, err := d.mux.Identity(id)
	if err != nil {
		return nil, err
	}
	e := d.newEntry(name, id, ident.UUID)
	if err := d.register(e); err != nil {
		return nil, err
	}
	return e, nil
}

// Started handles "started begin". QEMU runs: the live XML now holds an
// auto-assigned vsock CID, and libvirt has labelled the serial socket for
// QEMU's user (recorded, so a restarted bridge can restore it).
func (d controlHandler) Started(ctx context.Context, name string, xml []byte) (vm *control.VM, err error) {
	defer d.count(control.OpStarted, &err)
	return d.adopt("started", name, xml, true)
}

// adopt finds the live identity of the domain in xml and makes sure its
// listeners are open: the common part of "started begin" and "reconnect
// begin". started also checks that the vsock CID did not change since
// prepare and records the serial socket's owner.
func (d *Daemon) adopt(op, name string, xml []byte, started bool) (*control.VM, error) {
	dom, err := libvirt.ParseDomain(xml)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if name != "" && name != dom.Name {
		return nil, fmt.Errorf("%s: hook names domain %q, its XML %q", op, name, dom.Name)
	}
	if ok, why := d.wanted(dom); !ok {
		return skipped(dom, why), nil
	}
	unlock := d.names.Lock(dom.Name)
	defer unlock()
	if in := d.incomingOf(dom.Name); in != nil && in.dom.UUID == dom.UUID {
		// Migrating in: its sockets are open; the identity, and the
		// serving of the guest, come with the handover.
		return &control.VM{Name: dom.Name, UUID: conceal.FormatUUID(dom.UUID), Listeners: listenerInfoOf(in.ls), Note: "incoming: waiting for the handover"}, nil
	}
	e, err := d.liveEntry(dom.Name, &dom.UUID)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	plan, err := d.planFor(dom)
	if err != nil {
		return nil, err
	}
	if cid := e.getCID(); started && cid != 0 && plan.cid != 0 && plan.cid != cid {
		return nil, fmt.Errorf("%s %s: vsock cid is %d, was %d at prepare", op, dom.Name, plan.cid, cid)
	}
	if err := d.openListeners(e, plan); err != nil {
		return nil, fmt.Errorf("%s %s: %w", op, dom.Name, err)
	}
	if started && len(e.listenerInfo()) == 0 {
		d.log.Warn("vm started with no guest transport: its log can hold no measurements", "vm", dom.Name,
			"serial_channel", plan.serial != "", "vsock_cid", plan.cid, "vsock_on_host", d.vsockOn)
	}
	if started {
		e.mu.Lock()
		if e.serial != "" {
			if o := socketOwner(e.serial); o != nil {
				e.owner = o
			}
		}
		e.mu.Unlock()
	}
	d.saveState(e)
	if !started {
		d.log.Info("vm re-adopted after a libvirtd restart", "vm", dom.Name)
	}
	return d.vmInfo(e, d.identity(e.id)), nil
}

func (d *Daemon) identity(id conceal.Digest) *conceal.Identity {
	ident, err := d.mux.Identity(id)
	if err != nil {
		return nil
	}
	return ident
}

// Reconnect handles "reconnect begin": libvirtd restarted and re-attaches
// to a running domain. The bridge finds the domain's live identity (name
// and uuid) and makes sure its listeners are open (a bridge that restarted
// without the VM's listener state opens them from this XML).
func (d controlHandler) Reconnect(ctx context.Context, xml []byte) (vm *control.VM, err error) {
	defer d.count(control.OpReconnect, &err)
	return d.adopt("reconnect", "", xml, false)
}

// Stopped handles "stopped end". QEMU is gone, but libvirt gives the
// shutoff reason only to "release end", which follows at once (after it
// has restored the labels of the VM's files, the serial socket among
// them); the teardown and the closing of the listeners wait for it, at most
// stop_grace. A reason given here tears down at once.
func (d controlHandler) Stopped(ctx context.Context, name, reason string) (err error) {
	defer d.count(control.OpStopped, &err)
	unlock := d.names.Lock(name)
	defer unlock()
	if d.abortIncoming(name) {
		return nil
	}
	id, ok := d.mux.Lookup(name)
	if !ok {
		if e := d.entry(name); e != nil {
			d.closeEntry(e, true)
		}
		return nil
	}
	if r := normReason(reason); r != "" || d.cfg.StopGrace == 0 {
		return d.endInstance(name, id, orStopped(r))
	}
	d.stops.wait(name, id, time.Duration(d.cfg.StopGrace), false)
	return nil
}

// Release handles "release end": the listeners close and the teardown is
// recorded with libvirt's shutoff reason (recent libvirt passes it as the
// hook's last argument), or "stopped" when it gives none. A second call is
// a no-op.
func (d controlHandler) Release(ctx context.Context, name, reason string) (err error) {
	defer d.count(control.OpRelease, &err)
	unlock := d.names.Lock(name)
	defer unlock()
	if d.abortIncoming(name) {
		return nil
	}
	var id conceal.Digest
	if p := d.stops.take(name); p != nil {
		id = p.id
	} else {
		var ok bool
		if id, ok = d.mux.Lookup(name); !ok {
			if e := d.entry(name); e != nil {
				d.closeEntry(e, true)
			}
			return nil
		}
	}
	r := normReason(reason)
	if r == "" && d.following.Load() {
		// libvirt's hooks say nothing of why the domain stopped; its
		// stopped event, which follows, does. Wait for it briefly (the
		// listeners close now), then record the teardown with its detail.
		if e := d.entry(name); e != nil && e.id == id {
			d.closeEntry(e, true)
		}
		d.stops.wait(name, id, stopEventWait, true)
		return nil
	}
	return d.endInstance(name, id, orStopped(r))
}

// endInstance closes instance id's listeners and records its teardown.
// The caller holds the name's lock.
func (d *Daemon) endInstance(name string, id conceal.Digest, reason string) error {
	if done, err := d.sourceStop(name, id, reason); done {
		return err
	}
	if e := d.entry(name); e != nil && e.id == id {
		d.closeEntry(e, true)
	}
	return d.teardown(name, id, reason)
}

// teardown records the teardown of instance id (and its post-mortem
// quote) on the bridge's own clock, not the hook's.
func (d *Daemon) teardown(name string, id conceal.Digest, reason string) error {
	ctx, cancel := context.WithTimeout(context.Background(), lifecycleTimeout)
	defer cancel()
	if _, err := d.mux.Teardown(ctx, id, reason); err != nil && !errors.Is(err, mux.ErrEnded) {
		d.log.Error("teardown not recorded", "vm", name, "reason", reason, "err", err)
		return fmt.Errorf("teardown %s: %w", name, err)
	}
	d.states.remove(id)
	d.log.Info("vm torn down", "vm", name, "reason", reason)
	return nil
}

// normReason maps libvirt's shutoff reason ("-" when none) to the
// teardown reason.
func normReason(r string) string {
	r = strings.TrimSpace(r)
	if r == "-" || r == "unknown" {
		return ""
	}
	if len(r) > 64 {
		r = r[:64]
	}
	return strings.Map(func(c rune) rune {
		if c < 0x20 || c > 0x7e {
			return '?'
		}
		return c
	}, r)
}

func orStopped(r string) string {
	if r == "" {
		return "stopped"
	}
	return r
}
