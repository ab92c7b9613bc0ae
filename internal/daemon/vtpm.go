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

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// vtpmServer is one VM's bridge-served vTPM (docs/vtpm.md): the unix
// socket QEMU's TPM emulator backend connects to, and the vTPM behind it,
// whose every PCR change is a record in the VM's log (mux.Journal).
type vtpmServer struct {
	path string
	name string // the prefix of its fds' names in the fd store
	l    *net.UnixListener
	v    *vtpm.VTPM
	once sync.Once
	done chan struct{}
}

func (s *vtpmServer) close() {
	s.once.Do(func() { s.l.Close() })
}

// The names of a vTPM's fds in systemd's fd store.
func (s *vtpmServer) fdNames() []string {
	return []string{s.name + "-ctrl", s.name + "-data", s.name + "-inflight"}
}

// checkVTPMPath accepts only a socket directly in the vTPM directory, so a
// domain XML cannot make the bridge create or replace files elsewhere.
func (d *Daemon) checkVTPMPath(p string) (string, error) {
	dir := filepath.Clean(d.cfg.VTPMDir)
	c := filepath.Clean(p)
	base := filepath.Base(c)
	if !filepath.IsAbs(p) || filepath.Dir(c) != dir || base == "." || base == ".." || strings.HasPrefix(base, ".") {
		return "", fmt.Errorf("external TPM socket %q is not in the bridge's vTPM directory %s (vtpm_dir): the bridge serves vTPMs only there", p, dir)
	}
	return c, nil
}

// listenVTPM opens the vTPM socket at path, with the serial sockets' mode
// and group so that QEMU (user libvirt-qemu) can connect.
func (d *Daemon) listenVTPM(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("vtpm socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("vtpm socket %s exists and is not a socket", path)
		}
		os.Remove(path)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vtpm socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, d.set.serialMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("vtpm socket: %w", err)
	}
	if d.set.serialGID >= 0 {
		if err := os.Chown(path, -1, d.set.serialGID); err != nil {
			l.Close()
			return nil, fmt.Errorf("vtpm socket: %w", err)
		}
	}
	return l, nil
}

// serveVTPM starts e's vTPM on l, its PCRs the replay of past (nil for a
// new instance). Under systemd its connections, once QEMU has made them,
// and its in-flight record are kept in the fd store; kept ones a previous
// process left (a crash or restart) are served first. It ends when e
// closes.
// mods adjust the vTPM's configuration last (an incoming VM's: migrate.go).
func (d *Daemon) serveVTPM(e *vmEntry, path string, l *net.UnixListener, past []vpcr.Event, mods ...func(*vtpm.Config)) error {
	s := &vtpmServer{path: path, name: "vtpm-" + hex.EncodeToString(e.id[:8]), l: l, done: make(chan struct{})}
	names := s.fdNames()
	cfg := vtpm.Config{Banks: d.set.vtpmBanks, Journal: d.mux.Journal(e.id, d.cfg.VTPMMode == "anchored"), Logger: d.log.With("vm", e.name, "vtpm", path),
		Parker: d.vtpmParker()}
	for _, m := range mods {
		m(&cfg)
	}
	// An incoming VM's vTPM (live migration) has no identity, so no fd
	// store names, yet: its connections are not kept across a restart.
	if d.fds.on() && !cfg.Incoming {
		inf, err := d.inflight(names[2])
		if err != nil {
			l.Close()
			return fmt.Errorf("vtpm of %s: %w", e.name, err)
		}
		cfg.Inflight = inf
		cfg.Trace = func(control bool, code, rc uint32) {
			if control && code == ctrlSetDataFD && rc == 0 {
				go d.keepConns(e, s)
			}
		}
	}
	v, err := vtpm.New(cfg, past)
	if err != nil {
		l.Close()
		return fmt.Errorf("vtpm of %s: %w", e.name, err)
	}
	s.v = v
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		l.Close()
		return errors.New("vm is closing")
	}
	e.vtpm = s
	e.mu.Unlock()
	if ctrl, data := d.fds.take(names[0]), d.fds.take(names[1]); ctrl != nil && data != nil {
		d.adoptConns(e, s, ctrl, data)
	}
	e.wg.Add(1)
	v.StartListener(e.ctx, l, func(err error) {
		if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
			d.log.Warn("vtpm stopped", "vm", e.name, "err", err)
		}
		close(s.done)
		e.wg.Done()
	})
	d.log.Info("vtpm serving", "vm", e.name, "socket", path, "events", len(past))
	return nil
}

// vtpmParker returns the Parker all vTPMs share, made on first use; nil
// (each channel then keeps a goroutine) if it cannot be made.
func (d *Daemon) vtpmParker() *vtpm.Parker {
	d.parkerOnce.Do(func() {
		p, err := vtpm.NewParker()
		if err != nil {
			d.log.Warn("vtpm: idle channels keep a goroutine each", "err", err)
			return
		}
		d.parker = p
	})
	return d.parker
}

// restoreVTPM re-creates a live VM's vTPM after a bridge restart: its PCRs
// are the replay of the VM's vTPM records. QEMU's TPM emulator does not
// reconnect, so a guest that was connected to the previous process keeps
// its TPM only if that connection was handed over (docs/vtpm.md).
//
// A VM that migrated in replays this stay's events on the vPCRs it arrived
// with (its migrated-in record's snapshot, mux.VTPMStart), not on a reset
// TPM: TPMEvents holds only this stay's events.
func (d *Daemon) restoreVTPM(e *vmEntry, path string) error {
	past, err := d.mux.TPMEvents(e.id)
	if err != nil {
		return err
	}
	start, err := d.mux.VTPMStart(e.id)
	if err != nil {
		return fmt.Errorf("vtpm of %s: its arrival state: %w", e.name, err)
	}
	l, err := d.listenVTPM(path)
	if err != nil {
		return err
	}
	return d.serveVTPM(e, path, l, past, func(c *vtpm.Config) { c.Start = start })
}

// bankIDs converts banks to the TPM_ALG_IDs a genesis record carries.
func bankIDs(banks []vpcr.Alg) []uint16 {
	out := make([]uint16, len(banks))
	for i, b := range banks {
		out[i] = uint16(b)
	}
	return out
}

// ctrlSetDataFD is the swtpm control command that hands the data socket
// over: once it succeeded, QEMU's connections are complete.
const ctrlSetDataFD = 16

// inflight returns the vTPM's in-flight record: the memfd a previous
// process kept under name, or a new one, kept in the fd store.
func (d *Daemon) inflight(name string) (vtpm.Inflight, error) {
	f := d.fds.take(name)
	if f == nil {
		fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("in-flight record: memfd: %w", err)
		}
		f = os.NewFile(uintptr(fd), name)
		if err := d.fds.put(name, f); err != nil {
			f.Close()
			return nil, fmt.Errorf("in-flight record: %w", err)
		}
	}
	return vtpm.NewFileInflight(f)
}

// keepConns stores the vTPM's control connection and data socket in the fd
// store, so that a restarted bridge can serve them.
func (d *Daemon) keepConns(e *vmEntry, s *vtpmServer) {
	names := s.fdNames()
	for i, c := range []net.Conn{s.v.ControlConn(), s.v.DataConn()} {
		fc, ok := c.(interface{ File() (*os.File, error) })
		if c == nil || !ok {
			d.log.Warn("vtpm connection cannot be kept", "vm", e.name, "which", names[i])
			return
		}
		f, err := fc.File()
		if err != nil {
			d.log.Warn("vtpm connection cannot be kept", "vm", e.name, "which", names[i], "err", err)
			return
		}
		err = d.fds.put(names[i], f)
		f.Close()
		if err != nil {
			d.log.Warn("vtpm connection not kept in the fd store", "vm", e.name, "err", err)
			return
		}
	}
	d.log.Info("vtpm connections kept in the fd store", "vm", e.name)
}

// adoptConns serves the control connection and data socket a previous
// bridge process kept: the guest's TPM goes on where it was.
func (d *Daemon) adoptConns(e *vmEntry, s *vtpmServer, ctrlF, dataF *os.File) {
	defer ctrlF.Close()
	defer dataF.Close()
	cc, err := net.FileConn(ctrlF)
	if err != nil {
		d.log.Error("kept vtpm control connection unusable", "vm", e.name, "err", err)
		return
	}
	ctrl, ok := cc.(*net.UnixConn)
	if !ok {
		cc.Close()
		d.log.Error("kept vtpm control connection is not a unix socket", "vm", e.name)
		return
	}
	data, err := net.FileConn(dataF)
	if err != nil {
		ctrl.Close()
		d.log.Error("kept vtpm data socket unusable", "vm", e.name, "err", err)
		return
	}
	e.wg.Add(2)
	s.v.StartData(e.ctx, data, func(err error) {
		if err != nil && e.ctx.Err() == nil {
			d.log.Warn("kept vtpm data socket ended", "vm", e.name, "err", err)
		}
		e.wg.Done()
	})
	s.v.StartControl(e.ctx, ctrl, func(err error) {
		if e.ctx.Err() == nil {
			ctrl.Close()
			d.fds.remove(s.fdNames()[:2]...)
			if err != nil {
				d.log.Warn("kept vtpm control connection ended", "vm", e.name, "err", err)
			}
		}
		e.wg.Done()
	})
	d.log.Info("vtpm connections taken over from the previous bridge process", "vm", e.name)
}
