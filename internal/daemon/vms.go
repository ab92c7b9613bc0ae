package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Per-VM connection limits: a guest cannot make the bridge hold more than
// this many of its connections at once (each is a goroutine and a file
// descriptor); further ones are closed at once and counted.
const maxConnsPerVM = 8

// sessionDrain bounds the wait for a closing VM's sessions to end.
const sessionDrain = 10 * time.Second

// vmEntry is a live VM instance the daemon serves: its listeners and the
// guest connections accepted on them.
type vmEntry struct {
	name   string
	id     conceal.Digest
	uuid   [16]byte
	cid    uint32 // the CID its vsock listener checks, 0 if none
	serial string // its virtio-serial socket path, "" if none
	owner  *owner // the serial socket's owner as libvirt labelled it

	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	listeners []transport.Listener
	conns     map[net.Conn]struct{}
	closed    bool
	wg        sync.WaitGroup
}

func (d *Daemon) newEntry(name string, id conceal.Digest, uuid [16]byte) *vmEntry {
	ctx, cancel := context.WithCancel(d.bgCtx)
	return &vmEntry{name: name, id: id, uuid: uuid, ctx: ctx, cancel: cancel, conns: make(map[net.Conn]struct{})}
}

// state is what a restarted bridge needs to reopen e's listeners.
func (e *vmEntry) state() listenerState {
	e.mu.Lock()
	defer e.mu.Unlock()
	return listenerState{ID: hex.EncodeToString(e.id[:]), Name: e.name, UUID: conceal.FormatUUID(e.uuid), CID: e.cid, Serial: e.serial, Owner: e.owner}
}

// saveState records e's listeners for a restarted bridge.
func (d *Daemon) saveState(e *vmEntry) { d.states.save(e.id, e.state()) }

func (e *vmEntry) listenerInfo() []control.Listener {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]control.Listener, 0, len(e.listeners))
	for _, l := range e.listeners {
		out = append(out, control.Listener{Kind: string(l.Kind()), Addr: l.Addr()})
	}
	return out
}

func (e *vmEntry) hasKind(k transport.Kind) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, l := range e.listeners {
		if l.Kind() == k {
			return true
		}
	}
	return false
}

func (e *vmEntry) getCID() uint32 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cid
}

func (e *vmEntry) sessionCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.conns)
}

// listenPlan is which listeners a VM gets.
type listenPlan struct {
	serial string
	owner  *owner
	cid    uint32
}

// planFor derives the listeners of a domain from its XML, refusing a
// serial channel the bridge cannot serve.
func (d *Daemon) planFor(dom *libvirt.Domain) (listenPlan, error) {
	p := listenPlan{cid: dom.CID}
	if dom.SerialSocket != "" {
		if dom.SerialMode != "" && dom.SerialMode != "connect" {
			return p, fmt.Errorf("domain %s: channel %s has <source mode='%s'>: the bridge listens and QEMU connects, so it must be mode='connect'", dom.Name, transport.SerialPortName, dom.SerialMode)
		}
		path, err := d.checkSerialPath(dom.SerialSocket)
		if err != nil {
			return p, fmt.Errorf("domain %s: %w", dom.Name, err)
		}
		p.serial = path
	}
	return p, nil
}

// noTransport is the warning for a live VM that no guest transport reaches.
const noTransport = "no guest transport reaches the bridge (no org.tpmmux.0 channel, no usable vsock): the VM's log can hold no measurements"

// reachable says whether some guest transport will reach the bridge for
// dom under plan: its virtio-serial channel, a <vsock> device on a host
// that serves vsock (an auto-assigned CID is known only once QEMU runs), or
// the development unix socket.
func (d *Daemon) reachable(dom *libvirt.Domain, p listenPlan) bool {
	return p.serial != "" || (dom.Vsock && d.vsockOn) || d.cfg.GuestUnixDir != ""
}

// transportWarning is what vms says about a live VM with no listener.
func transportWarning(listeners []control.Listener) string {
	if len(listeners) == 0 {
		return noTransport
	}
	return ""
}

// checkSerialPath accepts only a socket directly in the serial directory,
// so a domain XML cannot make the bridge create or replace files elsewhere.
func (d *Daemon) checkSerialPath(p string) (string, error) {
	dir := filepath.Clean(d.cfg.SerialDir)
	c := filepath.Clean(p)
	base := filepath.Base(c)
	if !filepath.IsAbs(p) || filepath.Dir(c) != dir || base == "." || base == ".." || strings.HasPrefix(base, ".") {
		return "", fmt.Errorf("channel %s socket %q is not in the bridge's serial directory %s", transport.SerialPortName, p, dir)
	}
	return c, nil
}

// openListeners opens the listeners of plan that e lacks (and the dev
// unix socket if configured), all or none, and starts serving them.
func (d *Daemon) openListeners(e *vmEntry, p listenPlan) error {
	ls, err := d.listen(e, p)
	if err != nil {
		return err
	}
	return d.serveListeners(e, ls)
}

// serveListeners starts the accept loops of ls for e.
func (d *Daemon) serveListeners(e *vmEntry, ls []transport.Listener) error {
	for i, l := range ls {
		if !e.addListener(d, l) {
			for _, l := range ls[i:] {
				l.Close()
			}
			return errors.New("vm is closing")
		}
	}
	return nil
}

// listen opens the listeners of plan that e lacks, all or none, without
// serving them yet.
func (d *Daemon) listen(e *vmEntry, p listenPlan) ([]transport.Listener, error) {
	var opened []transport.Listener
	fail := func(err error) ([]transport.Listener, error) {
		for _, l := range opened {
			l.Close()
		}
		return nil, err
	}
	if p.serial != "" && !e.hasKind(transport.KindSerial) {
		d.mu.Lock()
		for _, o := range d.vms {
			o.mu.Lock()
			clash := o != e && o.serial == p.serial
			o.mu.Unlock()
			if clash {
				d.mu.Unlock()
				return fail(fmt.Errorf("serial socket %s is already used by vm %s", p.serial, o.name))
			}
		}
		d.mu.Unlock()
		l, own, err := d.listenSerial(p.serial, p.owner)
		if err != nil {
			return fail(err)
		}
		opened = append(opened, l)
		e.mu.Lock()
		e.serial, e.owner = p.serial, own
		e.mu.Unlock()
	}
	if p.cid != 0 {
		e.mu.Lock()
		e.cid = p.cid
		e.mu.Unlock()
	}
	if p.cid != 0 && d.vsockOn && !e.hasKind(transport.KindVsock) {
		l, err := transport.ListenVsock(p.cid, d.log.With("vm", e.name))
		if err != nil {
			return fail(err)
		}
		opened = append(opened, l)
	}
	if d.cfg.GuestUnixDir != "" && !e.hasKind(transport.KindUnix) {
		if strings.ContainsAny(e.name, "/\x00") || strings.HasPrefix(e.name, ".") {
			return fail(fmt.Errorf("vm name %q cannot name a socket file", e.name))
		}
		if err := os.MkdirAll(d.cfg.GuestUnixDir, 0o755); err != nil {
			return fail(err)
		}
		l, err := transport.ListenUnix(filepath.Join(d.cfg.GuestUnixDir, e.name+".sock"))
		if err != nil {
			return fail(err)
		}
		opened = append(opened, l)
	}
	return opened, nil
}

// listenSerial opens a virtio-serial socket. Its owner: the one libvirt
// gave the socket it replaces (libvirt's DAC driver labels a mode='connect'
// channel socket for QEMU's user at domain start and does not again when
// the bridge restarts), else the recorded one, else root and the configured
// group.
func (d *Daemon) listenSerial(path string, recorded *owner) (transport.Listener, *owner, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, err
	}
	own := recorded
	if o := socketOwner(path); o != nil && o.UID != 0 {
		own = o
	}
	l, err := transport.ListenSerial(path, d.set.serialMode, d.set.serialGID)
	if err != nil {
		return nil, nil, err
	}
	if own != nil && os.Geteuid() == 0 {
		if err := os.Chown(path, own.UID, own.GID); err != nil {
			d.log.Warn("serial socket: could not restore its owner", "path", path, "err", err)
		}
	}
	return l, own, nil
}

func socketOwner(path string) *owner {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return nil
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	return &owner{UID: int(st.Uid), GID: int(st.Gid)}
}

// addListener starts serving l for e.
func (e *vmEntry) addListener(d *Daemon, l transport.Listener) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	e.listeners = append(e.listeners, l)
	e.wg.Add(1)
	go d.acceptLoop(e, l)
	d.log.Info("guest listener open", "vm", e.name, "kind", l.Kind(), "addr", l.Addr())
	return true
}

func (d *Daemon) acceptLoop(e *vmEntry, l transport.Listener) {
	defer e.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || e.ctx.Err() != nil {
				return
			}
			d.log.Warn("guest listener: accept", "vm", e.name, "addr", l.Addr(), "err", err)
			select {
			case <-time.After(100 * time.Millisecond):
				continue
			case <-e.ctx.Done():
				return
			}
		}
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			c.Close()
			return
		}
		if len(e.conns) >= maxConnsPerVM {
			e.mu.Unlock()
			d.dropped.Add(1)
			d.log.Warn("guest connection dropped: too many connections from this VM", "vm", e.name, "kind", l.Kind(), "limit", maxConnsPerVM)
			c.Close()
			continue
		}
		e.conns[c] = struct{}{}
		e.wg.Add(1)
		e.mu.Unlock()
		go func() {
			defer e.wg.Done()
			defer func() {
				e.mu.Lock()
				delete(e.conns, c)
				e.mu.Unlock()
				c.Close()
			}()
			d.sessions.Add(1)
			defer d.sessions.Add(-1)
			if l.Resync() {
				transport.ServeSessions(e.ctx, c, func(ctx context.Context, s transport.SessionConn) {
					d.br.Serve(ctx, e.id, s, true)
				})
			} else {
				d.br.Serve(e.ctx, e.id, c, false)
			}
		}()
	}
}

// register makes e the live entry for its name.
func (d *Daemon) register(e *vmEntry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closing {
		return errors.New("the bridge is shutting down")
	}
	d.vms[e.name] = e
	return nil
}

func (d *Daemon) entry(name string) *vmEntry {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.vms[name]
}

// closeEntry closes e's listeners and connections and waits (bounded) for
// its sessions to end; with unregister it also drops e from the table.
func (d *Daemon) closeEntry(e *vmEntry, unregister bool) {
	if unregister {
		d.mu.Lock()
		if d.vms[e.name] == e {
			delete(d.vms, e.name)
		}
		d.mu.Unlock()
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.closed = true
	ls := e.listeners
	for _, l := range ls {
		d.refused.Add(l.Refused())
		l.Close()
	}
	for c := range e.conns {
		c.Close()
	}
	e.mu.Unlock()
	e.cancel()
	done := make(chan struct{})
	go func() { e.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(sessionDrain):
		d.log.Warn("guest sessions still ending after the listeners closed", "vm", e.name)
	}
	if len(ls) > 0 {
		d.log.Info("guest listeners closed", "vm", e.name, "count", len(ls))
	}
}

// closeAllVMs makes the daemon refuse new VMs and closes every VM's
// listeners and connections (shutdown, or a failed start).
func (d *Daemon) closeAllVMs() {
	d.mu.Lock()
	d.closing = true
	entries := make([]*vmEntry, 0, len(d.vms))
	for _, e := range d.vms {
		entries = append(entries, e)
	}
	d.mu.Unlock()
	for _, e := range entries {
		d.closeEntry(e, true)
	}
}

// refusedTotal is the number of connections refused by peer checks, on
// open and closed listeners.
func (d *Daemon) refusedTotal() uint64 {
	n := d.refused.Load()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range d.vms {
		e.mu.Lock()
		if !e.closed {
			for _, l := range e.listeners {
				n += l.Refused()
			}
		}
		e.mu.Unlock()
	}
	return n
}

// restoreLive opens the listeners of every VM instance that is live in the
// store (the bridge restarted while VMs run): the serial socket at the path
// recorded at prepare, so QEMU's channel (with <reconnect>) finds it again,
// vsock by the recorded CID, the dev unix socket by name.
func (d *Daemon) restoreLive(ctx context.Context) {
	infos, err := d.mux.LiveVMs()
	if err != nil {
		d.log.Error("listing live VMs", "err", err)
		return
	}
	live := map[string]bool{}
	for _, v := range infos {
		live[hex.EncodeToString(v.ID[:])] = true
		e := d.newEntry(v.Name, v.ID, v.UUID)
		p := listenPlan{cid: v.CID}
		if st := d.states.load(v.ID); st != nil {
			if st.CID != 0 {
				p.cid = st.CID
			}
			if st.Serial != "" {
				if path, err := d.checkSerialPath(st.Serial); err == nil {
					p.serial, p.owner = path, st.Owner
				} else {
					d.log.Warn("recorded serial socket no longer allowed", "vm", v.Name, "err", err)
				}
			}
		} else {
			d.log.Warn("no listener state for a live VM: its virtio-serial socket reopens when libvirt reconnects (or at its next start)", "vm", v.Name)
		}
		if err := d.register(e); err != nil {
			return
		}
		if err := d.openListeners(e, p); err != nil {
			d.log.Error("live VM: listeners not reopened", "vm", v.Name, "err", err)
		}
		d.saveState(e)
		d.log.Info("live VM re-adopted", "vm", v.Name, "listeners", len(e.listenerInfo()))
	}
	// Drop the state of instances that are no longer live.
	d.states.keepOnly(live)
}
