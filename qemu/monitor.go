// Package qemu talks QMP (the QEMU Machine Protocol) to a running VM, with
// github.com/digitalocean/go-qemu: either through libvirt
// (virDomainQemuMonitorCommand, for VMs that libvirt runs) or through a
// plain QMP unix socket (for QEMU run without libvirt). On top of that it
// offers what the bridge needs: the vsock guest CID of the running VM
// (VsockCID, CheckCID), its run state (Status) and a policy action (Pause).
//
// QEMU is part of the host's trusted computing base, so its replies are
// trusted to be honest, but they are still parsed strictly: a reply of an
// unexpected shape is an error, never a zero value.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-qemu/qmp"

	"github.com/tpmmux/tpmmux/internal/await"
)

// Monitor runs QMP commands on one running QEMU.
type Monitor interface {
	// Run sends one QMP command, a JSON object such as
	// {"execute":"query-status"}, and returns QEMU's reply object
	// ({"return": ...}). A reply that carries a QMP error is an error.
	Run(ctx context.Context, cmd []byte) ([]byte, error)
	// Close releases the monitor. It does not stop the VM.
	Close() error
}

// DefaultDialTimeout bounds connecting to a QMP socket when ctx has no
// earlier deadline.
const DefaultDialTimeout = 5 * time.Second

// SocketMonitor is a Monitor on a QEMU QMP unix socket (QEMU started with
// -qmp unix:PATH,server=on,wait=off), through go-qemu's qmp.SocketMonitor.
//
// QEMU serves one client per QMP socket at a time: while another client
// holds it, the greeting never comes and DialSocket waits until ctx ends.
type SocketMonitor struct {
	mon  *qmp.SocketMonitor
	path string

	closeOnce sync.Once
	closeErr  error
}

// DialSocket connects to the QMP unix socket at path and does the
// capabilities handshake.
func DialSocket(ctx context.Context, path string) (*SocketMonitor, error) {
	timeout := await.Timeout(ctx, DefaultDialTimeout)
	if timeout <= 0 {
		return nil, fmt.Errorf("qmp dial %s: %w", path, context.DeadlineExceeded)
	}
	qm, err := qmp.NewSocketMonitor("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("qmp dial %s: %w", path, err)
	}
	done := make(chan error, 1)
	go func() { done <- qm.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			_ = qm.Disconnect()
			return nil, fmt.Errorf("qmp handshake on %s: %w", path, err)
		}
	case <-ctx.Done():
		// Closing the socket unblocks the handshake (typically waiting for
		// a greeting that another client's session holds back).
		_ = qm.Disconnect()
		if err := <-done; err == nil {
			_ = qm.Disconnect() // the handshake won the race: drain it
		}
		return nil, fmt.Errorf("qmp handshake on %s: %w", path, ctx.Err())
	}
	return &SocketMonitor{mon: qm, path: path}, nil
}

// Version is the QEMU version the socket's greeting announced, e.g. "7.2.22".
func (m *SocketMonitor) Version() string {
	if m.mon.Version == nil {
		return ""
	}
	return m.mon.Version.String()
}

// Run implements Monitor. When ctx ends before QEMU replies, the monitor is
// closed (a reply arriving later could not be matched to its command) and
// the error wraps ctx.Err().
func (m *SocketMonitor) Run(ctx context.Context, cmd []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", m.path, err)
	}
	out, err := await.Do(ctx, func() ([]byte, error) { return m.mon.Run(cmd) })
	if err != nil && ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		// A reply arriving later could not be matched to its command.
		_ = m.Close()
		return nil, fmt.Errorf("qmp %s: %w (monitor closed)", m.path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", m.path, err)
	}
	return out, nil
}

// Close implements Monitor.
func (m *SocketMonitor) Close() error {
	m.closeOnce.Do(func() { m.closeErr = m.mon.Disconnect() })
	if m.closeErr != nil {
		return fmt.Errorf("qmp close %s: %w", m.path, m.closeErr)
	}
	return nil
}

// LibvirtConn is the part of a go-libvirt connection that LibvirtMonitor
// uses; *golibvirt.Libvirt (libvirt.Client.Libvirt()) implements it.
type LibvirtConn interface {
	DomainLookupByUUID(UUID golibvirt.UUID) (golibvirt.Domain, error)
	QEMUDomainMonitorCommand(Dom golibvirt.Domain, Cmd string, Flags uint32) (string, error)
}

// ErrInstanceChanged is returned by LibvirtMonitor.Run when the domain is
// no longer the running instance the monitor was opened on (it stopped,
// or stopped and started again).
var ErrInstanceChanged = errors.New("domain instance changed")

// LibvirtMonitor is a Monitor that sends QMP through libvirtd (the API
// behind `virsh qemu-monitor-command`) on a connection the caller owns. It
// is bound to one running instance of a domain: a command after the domain
// stopped or restarted fails with ErrInstanceChanged rather than reaching
// the next instance.
//
// libvirt marks a domain driven this way as tainted ("custom-monitor" in
// the domain log); state changes made over QMP (e.g. "stop") are still
// seen by libvirt through QEMU's events.
type LibvirtMonitor struct {
	conn LibvirtConn
	dom  golibvirt.Domain
}

// NewLibvirtMonitor opens a monitor on the running domain with this UUID.
func NewLibvirtMonitor(ctx context.Context, conn LibvirtConn, uuid [16]byte) (*LibvirtMonitor, error) {
	dom, err := await.Do(ctx, func() (golibvirt.Domain, error) { return conn.DomainLookupByUUID(golibvirt.UUID(uuid)) })
	if err != nil {
		return nil, fmt.Errorf("qmp via libvirt: look up domain %x: %w", uuid, err)
	}
	if dom.ID <= 0 {
		return nil, fmt.Errorf("qmp via libvirt: domain %s is not running", dom.Name)
	}
	return &LibvirtMonitor{conn: conn, dom: dom}, nil
}

// Domain is the name of the monitored domain.
func (m *LibvirtMonitor) Domain() string { return m.dom.Name }

// Run implements Monitor. When ctx ends first the command may still run.
func (m *LibvirtMonitor) Run(ctx context.Context, cmd []byte) ([]byte, error) {
	cur, err := await.Do(ctx, func() (golibvirt.Domain, error) { return m.conn.DomainLookupByUUID(m.dom.UUID) })
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return nil, fmt.Errorf("qmp via libvirt on %s: %w (domain gone)", m.dom.Name, ErrInstanceChanged)
		}
		return nil, fmt.Errorf("qmp via libvirt on %s: look up: %w", m.dom.Name, err)
	}
	if cur.ID != m.dom.ID {
		return nil, fmt.Errorf("qmp via libvirt on %s: %w (id %d, now %d)", m.dom.Name, ErrInstanceChanged, m.dom.ID, cur.ID)
	}
	out, err := await.Do(ctx, func() (string, error) { return m.conn.QEMUDomainMonitorCommand(m.dom, string(cmd), 0) })
	if err != nil {
		return nil, fmt.Errorf("qmp via libvirt on %s: %w", m.dom.Name, err)
	}
	return []byte(out), nil
}

// Close implements Monitor; the libvirt connection stays open.
func (m *LibvirtMonitor) Close() error { return nil }

// qmpError is an error reply from QEMU.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error implements error.
func (e *qmpError) Error() string { return e.Class + ": " + e.Desc }

// Execute runs the QMP command execute with args (nil for none) and
// decodes the reply's "return" member into ret (nil to ignore it).
func Execute(ctx context.Context, mon Monitor, execute string, args, ret any) error {
	cmd, err := json.Marshal(qmp.Command{Execute: execute, Args: args})
	if err != nil {
		return fmt.Errorf("qmp %s: encode: %w", execute, err)
	}
	out, err := mon.Run(ctx, cmd)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", execute, err)
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
		Error  *qmpError       `json:"error"`
	}
	if err := json.Unmarshal(out, &reply); err != nil {
		return fmt.Errorf("qmp %s: decode reply: %w", execute, err)
	}
	if reply.Error != nil {
		return fmt.Errorf("qmp %s: %w", execute, reply.Error)
	}
	if reply.Return == nil {
		return fmt.Errorf("qmp %s: reply has no return member", execute)
	}
	if ret == nil {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(reply.Return))
	dec.UseNumber()
	if err := dec.Decode(ret); err != nil {
		return fmt.Errorf("qmp %s: decode return: %w", execute, err)
	}
	return nil
}
