package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// vtpmServer is one VM's bridge-served vTPM (docs/vtpm.md): the unix
// socket QEMU's TPM emulator backend connects to, and the vTPM behind it,
// whose every PCR change is a record in the VM's log (mux.Journal).
type vtpmServer struct {
	path string
	l    *net.UnixListener
	v    *vtpm.VTPM
	once sync.Once
	done chan struct{}
}

func (s *vtpmServer) close() {
	s.once.Do(func() { s.l.Close() })
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
// new instance). It ends when e closes.
func (d *Daemon) serveVTPM(e *vmEntry, path string, l *net.UnixListener, past []vpcr.Event) error {
	v, err := vtpm.New(vtpm.Config{Banks: d.set.vtpmBanks, Journal: d.mux.Journal(e.id), Logger: d.log.With("vm", e.name, "vtpm", path)}, past)
	if err != nil {
		l.Close()
		return fmt.Errorf("vtpm of %s: %w", e.name, err)
	}
	s := &vtpmServer{path: path, l: l, v: v, done: make(chan struct{})}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		l.Close()
		return errors.New("vm is closing")
	}
	e.vtpm = s
	e.mu.Unlock()
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer close(s.done)
		if err := v.ServeListener(e.ctx, l); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
			d.log.Warn("vtpm stopped", "vm", e.name, "err", err)
		}
	}()
	d.log.Info("vtpm serving", "vm", e.name, "socket", path, "events", len(past))
	return nil
}

// restoreVTPM re-creates a live VM's vTPM after a bridge restart: its PCRs
// are the replay of the VM's vTPM records. QEMU's TPM emulator does not
// reconnect, so a guest that was connected to the previous process keeps
// its TPM only if that connection was handed over (docs/vtpm.md).
func (d *Daemon) restoreVTPM(e *vmEntry, path string) error {
	past, err := d.mux.TPMEvents(e.id)
	if err != nil {
		return err
	}
	l, err := d.listenVTPM(path)
	if err != nil {
		return err
	}
	return d.serveVTPM(e, path, l, past)
}

// bankIDs converts banks to the TPM_ALG_IDs a genesis record carries.
func bankIDs(banks []vpcr.Alg) []uint16 {
	out := make([]uint16, len(banks))
	for i, b := range banks {
		out[i] = uint16(b)
	}
	return out
}
