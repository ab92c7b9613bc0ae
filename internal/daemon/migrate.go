package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Live migration (docs/migration.md). As the source, the bridge keeps a
// VM that a destination reserved, takes libvirt's "stopped, migrated" for
// the handover (not a teardown), and a resume of the VM for an aborted
// migration. As the destination, "migrate begin" reserves the VM at its
// source, "prepare begin" opens the incoming VM's sockets without giving it
// an identity, and the handover (migrate.Engine.Receive) brings its
// identity: the bridge then opens its segment (mux MigrateIn), adopts the
// vTPM's PCRs and starts serving the guest.

// migrateTimeoutMargin is kept off the hook's deadline for the reply.
const migrateTimeoutMargin = 100 * time.Millisecond

// incomingVM is a VM migrating in: its sockets exist (QEMU connects to
// them as it starts), nothing is served before the handover.
type incomingVM struct {
	e       *vmEntry
	dom     *libvirt.Domain
	xml     []byte
	ls      []transport.Listener // not serving until the handover
	journal *lateJournal         // the vTPM's journal, once the identity is known
	ctx     context.Context
	cancel  context.CancelFunc
	source  string
}

// lateJournal is an incoming vTPM's journal: the VM's identity (and so its
// log) is known only after the handover, and an incoming vTPM journals
// nothing before Adopt.
type lateJournal struct {
	mu sync.Mutex
	j  vtpm.Journal
}

func (l *lateJournal) set(j vtpm.Journal) {
	l.mu.Lock()
	l.j = j
	l.mu.Unlock()
}

// Append implements vtpm.Journal.
func (l *lateJournal) Append(ctx context.Context, e vpcr.Event) error {
	l.mu.Lock()
	j := l.j
	l.mu.Unlock()
	if j == nil {
		return errors.New("the migrating VM has no identity here yet")
	}
	return j.Append(ctx, e)
}

// engineMux is the multiplexer as the migration engine uses it.
type engineMux struct{ d *Daemon }

func (m engineMux) Lookup(name string) (conceal.Digest, bool) { return m.d.mux.Lookup(name) }
func (m engineMux) Identity(id conceal.Digest) (*conceal.Identity, error) {
	return m.d.mux.Identity(id)
}
func (m engineMux) MigrateOut(ctx context.Context, id conceal.Digest, out migrate.Out) (*evidence.Evidence, error) {
	return m.d.migrateOut(ctx, id, out)
}

// startMigration makes the migration engine when the configuration has a
// migration block, and serves its peer listener.
func (d *Daemon) startMigration() error {
	mc := d.cfg.Migration
	if !mc.Enabled() {
		return nil
	}
	o := migrate.Options{Config: mc, StateDir: d.cfg.StateDir, Host: d.host, AK: d.tpm.AK(), Mux: engineMux{d},
		Snapshot: d.vtpmSnapshot, Logger: d.log.With("part", "migration")}
	if en, ok := d.tpm.(tpm.Enroller); ok {
		o.TPM = activator{en}
	}
	eng, err := migrate.New(o)
	if err != nil {
		return fmt.Errorf("migration: %w", err)
	}
	d.mig = eng
	if mc.Listen == "" {
		d.log.Info("migration: no listener (this bridge is a destination only)", "cert_sha256", eng.CertSHA256())
		return nil
	}
	ln, err := net.Listen("tcp", mc.Listen)
	if err != nil {
		return fmt.Errorf("migration listener: %w", err)
	}
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		if err := eng.Serve(d.bgCtx, ln); err != nil {
			d.log.Error("migration listener stopped", "err", err)
		}
	}()
	peers, _, _ := eng.Stats()
	d.log.Info("migration: serving peers", "listen", ln.Addr().String(), "cert_sha256", eng.CertSHA256(), "peers", peers)
	return nil
}

// activator adapts tpm.Enroller to migrate.Activator.
type activator struct{ tpm.Enroller }

// migrationStatus is the status's migration part.
func (d *Daemon) migrationStatus() *control.MigrationStatus {
	if d.mig == nil {
		return nil
	}
	peers, reserved, incoming := d.mig.Stats()
	return &control.MigrationStatus{Listen: d.cfg.Migration.Listen, CertSHA256: d.mig.CertSHA256(), Peers: peers, Reserved: reserved, Incoming: incoming}
}

// vtpmSnapshot is a vTPM VM's vPCRs as it stops for migration (nil for a
// VM without a bridge-served vTPM).
func (d *Daemon) vtpmSnapshot(name string) (*vpcr.Snapshot, error) {
	e := d.entry(name)
	if e == nil {
		return nil, nil
	}
	e.mu.Lock()
	s := e.vtpm
	e.mu.Unlock()
	if s == nil || s.v == nil {
		return nil, nil
	}
	return s.v.PCRs().Snapshot(), nil
}

// MigrateBegin handles the destination's "migrate begin": the incoming
// domain's identity is reserved at the source bridge, or the hook fails
// and libvirt cancels the migration.
func (d controlHandler) MigrateBegin(ctx context.Context, name string, xml []byte) (vm *control.VM, err error) {
	defer d.count(control.OpMigrate, &err)
	dom, err := libvirt.ParseDomain(xml)
	if err != nil {
		return nil, fmt.Errorf("migrate: %w", err)
	}
	if name != "" && name != dom.Name {
		return nil, fmt.Errorf("migrate: hook names domain %q, its XML %q", name, dom.Name)
	}
	if ok, why := d.wanted(dom); !ok {
		return skipped(dom, why), nil
	}
	if d.mig == nil {
		return nil, fmt.Errorf("migrate %s: this bridge has no migration block in its configuration, so the VM's attested identity cannot move here: add \"migration\" with the source bridge among its peers (docs/migration.md), or opt the domain out", dom.Name)
	}
	if _, live := d.mux.Lookup(dom.Name); live {
		return nil, fmt.Errorf("migrate %s: a VM of that name is live on this bridge", dom.Name)
	}
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-migrateTimeoutMargin))
		defer cancel()
	}
	src, err := d.mig.Reserve(ctx, dom.UUID, dom.Name)
	if err != nil {
		return nil, fmt.Errorf("migrate %s: %w", dom.Name, err)
	}
	d.log.Info("incoming migration reserved", "vm", dom.Name, "source", src)
	return &control.VM{Name: dom.Name, UUID: conceal.FormatUUID(dom.UUID), Note: "reserved at " + src + " for the handover"}, nil
}

// resumeIncoming takes up, after a restart, the incoming migrations the
// previous process held: one whose domain was prepared gets its sockets
// again (the guest's serial channel reconnects; a vTPM connection does
// not survive the restart) and waits for its handover as before; one that
// never got to prepare failed at libvirt, and is cancelled.
func (d *Daemon) resumeIncoming() {
	if d.mig == nil {
		return
	}
	for _, p := range d.mig.Incoming() {
		unlock := d.names.Lock(p.Name)
		err := d.resumeOne(p)
		unlock()
		if err != nil {
			d.log.Warn("migration: an incoming migration left by the previous process is cancelled", "vm", p.Name, "source", p.Source, "err", err)
			ctx, cancel := context.WithTimeout(d.bgCtx, 10*time.Second)
			if cerr := d.mig.Cancel(ctx, p.UUID); cerr != nil {
				d.log.Info("migration: the source did not take the cancel", "vm", p.Name, "err", cerr)
			}
			cancel()
		}
	}
}

func (d *Daemon) resumeOne(p migrate.PendingVM) error {
	if p.Domain == nil {
		return errors.New("its domain was never prepared here")
	}
	if _, live := d.mux.Lookup(p.Name); live {
		return errors.New("a VM of that name is live here")
	}
	dom, err := libvirt.ParseDomain(p.Domain)
	if err != nil {
		return err
	}
	plan, err := d.planFor(dom)
	if err != nil {
		return err
	}
	if _, err := d.prepareIncoming(dom, p.Domain, plan); err != nil {
		return err
	}
	d.log.Info("migration: incoming VM taken up again after a restart, waiting for its handover", "vm", p.Name, "source", p.Source)
	return nil
}

// incomingOf returns name's incoming VM, if it is one.
func (d *Daemon) incomingOf(name string) *incomingVM {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.incoming[name]
}

// prepareIncoming is "prepare begin" of a VM migrating in: its sockets
// open (vTPM served as incoming: QEMU moves its state blobs through it),
// nothing else is served, and the handover is awaited in the background.
// The caller holds the name's lock.
func (d *Daemon) prepareIncoming(dom *libvirt.Domain, xml []byte, plan listenPlan) (*control.VM, error) {
	e := d.newEntry(dom.Name, conceal.Digest{}, dom.UUID)
	ls, err := d.listen(e, plan)
	if err != nil {
		return nil, fmt.Errorf("prepare incoming %s: %w", dom.Name, err)
	}
	in := &incomingVM{e: e, dom: dom, xml: xml, ls: ls}
	in.ctx, in.cancel = context.WithCancel(d.bgCtx)
	fail := func(err error) (*control.VM, error) {
		for _, l := range ls {
			l.Close()
		}
		d.closeEntry(e, true)
		in.cancel()
		return nil, fmt.Errorf("prepare incoming %s: %w", dom.Name, err)
	}
	if plan.vtpm != "" {
		vl, err := d.listenVTPM(plan.vtpm)
		if err != nil {
			return fail(err)
		}
		in.journal = &lateJournal{}
		if err := d.serveVTPM(e, plan.vtpm, vl, nil, func(c *vtpm.Config) {
			c.Incoming, c.Journal = true, in.journal
		}); err != nil {
			return fail(err)
		}
	}
	if err := d.register(e); err != nil {
		return fail(err)
	}
	if err := d.mig.SetDomain(dom.UUID, xml); err != nil {
		d.log.Warn("migration: the incoming domain is not kept for a restart", "vm", dom.Name, "err", err)
	}
	d.mu.Lock()
	d.incoming[dom.Name] = in
	d.mu.Unlock()
	d.bg.Add(1)
	go d.receive(in)
	d.log.Info("incoming vm: sockets open, waiting for the handover", "vm", dom.Name)
	return &control.VM{Name: dom.Name, UUID: conceal.FormatUUID(dom.UUID), Listeners: listenerInfoOf(ls), Note: "incoming: waiting for the handover"}, nil
}

func listenerInfoOf(ls []transport.Listener) []control.Listener {
	var out []control.Listener
	for _, l := range ls {
		out = append(out, control.Listener{Kind: string(l.Kind()), Addr: l.Addr()})
	}
	return out
}

// receive waits for in's handover, then opens its segment here and starts
// serving the guest. Any failure cancels the reservation and leaves no
// identity here.
func (d *Daemon) receive(in *incomingVM) {
	defer d.bg.Done()
	name, uuid := in.dom.Name, in.dom.UUID
	ar, err := d.mig.Receive(in.ctx, uuid)
	unlock := d.names.Lock(name)
	defer unlock()
	if d.incomingOf(name) != in {
		return // aborted meanwhile
	}
	if err != nil && d.bgCtx.Err() != nil {
		// The bridge shuts down: the reservation stays (at rest here and
		// at the source) for the next process to take up.
		d.mu.Lock()
		delete(d.incoming, name)
		d.mu.Unlock()
		for _, l := range in.ls {
			l.Close()
		}
		return
	}
	if err == nil {
		err = d.arrive(in, ar)
	}
	if err != nil {
		d.log.Error("incoming migration failed: the VM gets no identity here", "vm", name, "err", err)
		d.dropIncoming(in, true)
		return
	}
	d.mu.Lock()
	delete(d.incoming, name)
	d.mu.Unlock()
	ctx, cancel := context.WithTimeout(d.bgCtx, lifecycleTimeout)
	defer cancel()
	if err := d.mig.Done(ctx, uuid); err != nil {
		d.log.Warn("migration: could not tell the source the handover completed (it keeps the sealed handover until then)", "vm", name, "err", err)
	}
	d.log.Info("vm migrated in", "vm", name, "source", ar.SourceHost)
}

// arrive opens the arrived VM's segment (MigrateIn), installs its vTPM
// state and serves its listeners. The caller holds the name's lock.
func (d *Daemon) arrive(in *incomingVM, ar *migrate.Arrival) error {
	ctx, cancel := context.WithTimeout(in.ctx, lifecycleTimeout)
	defer cancel()
	l := d.br.Launch(in.dom, in.xml)
	id, err := d.migrateIn(ctx, ar, l)
	if err != nil {
		return err
	}
	e := in.e
	e.mu.Lock()
	e.id = id
	s := e.vtpm
	e.mu.Unlock()
	if s != nil {
		in.journal.set(d.mux.Journal(id, d.cfg.VTPMMode == "anchored"))
		if err := s.v.Adopt(ar.VPCRs, nil); err != nil {
			return fmt.Errorf("vtpm: %w", err)
		}
	}
	if err := d.serveListeners(e, in.ls); err != nil {
		return err
	}
	d.saveState(e)
	return nil
}

// dropIncoming forgets incoming VM in: its sockets close, the reservation
// at the source is cancelled (with cancelSource), nothing is kept. The
// caller holds the name's lock.
func (d *Daemon) dropIncoming(in *incomingVM, cancelSource bool) {
	d.mu.Lock()
	if d.incoming[in.dom.Name] == in {
		delete(d.incoming, in.dom.Name)
	}
	d.mu.Unlock()
	in.cancel()
	for _, l := range in.ls {
		l.Close()
	}
	d.closeEntry(in.e, true)
	if id, ok := d.mux.Lookup(in.dom.Name); ok && id == in.e.id {
		// MigrateIn ran but the VM could not be served: end it here.
		d.teardown(in.dom.Name, id, "migration-failed")
	}
	if cancelSource {
		ctx, cancel := context.WithTimeout(d.bgCtx, 10*time.Second)
		defer cancel()
		if err := d.mig.Cancel(ctx, in.dom.UUID); err != nil {
			d.log.Info("migration: the source did not take the cancel", "vm", in.dom.Name, "err", err)
		}
	}
}

// abortIncoming is a stop of a VM still migrating in (libvirt's "stopped
// end" or "release end" on the destination of a failed or aborted
// migration). The caller holds the name's lock. It reports whether name
// was incoming.
func (d *Daemon) abortIncoming(name string) bool {
	in := d.incomingOf(name)
	if in == nil {
		return false
	}
	d.log.Info("incoming migration aborted: the VM's sockets close and nothing of its identity is kept", "vm", name)
	d.dropIncoming(in, true)
	return true
}

// migratedOut is the source's "stopped, reason migrated" of a reserved VM:
// not a teardown; the handover is answered now (migrate.Engine), which
// ends the VM's segment here with its migrated-out record. The caller
// holds the name's lock.
func (d *Daemon) migratedOut(name string, id conceal.Digest) error {
	d.mig.SourceStopped(name) // takes the vTPM's snapshot: before the entry closes
	if e := d.entry(name); e != nil && e.id == id {
		d.closeEntry(e, true)
	}
	d.states.remove(id)
	d.log.Info("vm stopped for migration: handing it over", "vm", name)
	return nil
}

// sourceStop decides a stop of a VM reserved for migration: reason
// migrated hands it over, and so does an unknown reason ("stopped": no
// libvirt event in time, or none followed), since a source VM that stops
// while a destination waits for it is almost always the migration's end,
// and tearing it down would leave the destination's VM without its
// identity. Another reason from libvirt's events (destroyed, crashed, …)
// is a real stop during the migration: the reservation is dropped and the
// VM torn down. It reports whether it handled the stop.
func (d *Daemon) sourceStop(name string, id conceal.Digest, reason string) (bool, error) {
	if d.mig == nil || !d.mig.Reserved(name) {
		return false, nil
	}
	switch {
	case reason == "migrated":
		return true, d.migratedOut(name, id)
	case reason == "stopped":
		d.log.Warn("a VM reserved for migration stopped without a reason from libvirt (follow its events: \"libvirt\" in the configuration): taking the stop as the migration's", "vm", name)
		return true, d.migratedOut(name, id)
	}
	d.mig.SourceResumed(name) // drops the reservation unless handed over
	return false, nil
}
