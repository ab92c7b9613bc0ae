package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Per-VM connection limits: a guest cannot make the bridge hold more than
// this many of its connections at once (each is a goroutine and a file
// descriptor); further ones are closed at once and counted.
const maxConnsPerVM = 8

// listenPlan is which listeners a VM gets.
type listenPlan struct {
	serial string
	owner  *owner
	cid    uint32
	vtpm   string // the vTPM socket path, "" if none
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
	if dom.VTPMSocket != "" {
		path, err := d.checkVTPMPath(dom.VTPMSocket)
		if err != nil {
			return p, fmt.Errorf("domain %s: %w", dom.Name, err)
		}
		p.vtpm = path
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
