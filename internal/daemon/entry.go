package daemon

import (
	"context"
	"encoding/hex"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/transport"
)

// sessionDrain bounds the wait for a closing VM's sessions to end.
const sessionDrain = 10 * time.Second

// vmEntry is a live VM instance the daemon serves: its listeners and the
// guest connections accepted on them.
type vmEntry struct {
	name   string
	id     conceal.Digest
	uuid   [16]byte
	cid    uint32      // the CID its vsock listener checks, 0 if none
	serial string      // its virtio-serial socket path, "" if none
	owner  *owner      // the serial socket's owner as libvirt labelled it
	vtpm   *vtpmServer // its bridge-served vTPM, nil if none

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
	st := listenerState{ID: hex.EncodeToString(e.id[:]), Name: e.name, UUID: conceal.FormatUUID(e.uuid), CID: e.cid, Serial: e.serial, Owner: e.owner}
	if e.vtpm != nil {
		st.VTPM = e.vtpm.path
	}
	return st
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
	if e.vtpm != nil {
		e.vtpm.close()
		// A VM that ends gives up its kept fds; a bridge that shuts down
		// leaves them to the next process.
		d.mu.Lock()
		shutdown := d.closing
		d.mu.Unlock()
		if unregister && !shutdown {
			d.fds.remove(e.vtpm.fdNames()...)
		}
	}
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
