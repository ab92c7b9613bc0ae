package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/tpmmux/tpmmux/libvirt"
)

// A domain that starts without the bridge's listener (opted out, not opted
// in, or failing open while the bridge is down or refuses) still carries its
// org.tpmmux.0 channel, and libvirt's DAC driver stats and chowns the
// channel's socket at start: with no file there the start fails
// ("unable to stat: /run/tpmmux/serial/vm-a.sock"). So the hook leaves a
// placeholder: a unix socket inode nobody listens on. QEMU's
// <reconnect enabled='yes'> treats the refused connection like a bridge
// that is not there yet and keeps retrying; the domain runs unattested.
//
// When the bridge (re)starts it does not touch the placeholder: the domain
// has no identity, so the bridge has no listener for it (with `libvirt`
// set it reports the running domain as unattested). The domain gets an
// identity at its next start, when the bridge replaces the placeholder as it
// replaces any stale socket in its serial directory. The hook removes a
// placeholder at "release end" (after libvirt restored its owner) when
// nobody listens on it.

// placeholderPath is where the hook may leave a placeholder for dom: the
// org.tpmmux.0 channel's socket when QEMU connects to it and it is directly
// in serial_dir (the rule the bridge applies, so a domain XML cannot make
// the hook create files elsewhere). "" when none applies.
func placeholderPath(dom *libvirt.Domain, serialDir string) string {
	if dom == nil || dom.SerialSocket == "" || (dom.SerialMode != "" && dom.SerialMode != "connect") {
		return ""
	}
	dir := filepath.Clean(serialDir)
	c := filepath.Clean(dom.SerialSocket)
	base := filepath.Base(c)
	if !filepath.IsAbs(dom.SerialSocket) || filepath.Dir(c) != dir || base == "." || base == ".." || strings.HasPrefix(base, ".") {
		return ""
	}
	return c
}

// ensurePlaceholder makes sure a socket exists at path: an existing one
// (the bridge's listener, or an earlier placeholder) is left alone; a file
// that is not a socket is an error (libvirt would hand QEMU something that
// is not the bridge).
func ensurePlaceholder(path string) (created bool, err error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return false, fmt.Errorf("%s exists and is not a socket", path)
		}
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, fmt.Errorf("placeholder socket %s: %w", path, err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return false, nil // someone made one meanwhile
		}
		return false, fmt.Errorf("placeholder socket %s: %w", path, err)
	}
	// Closing keeps the inode: connections to it are refused from now on.
	l.SetUnlinkOnClose(false)
	l.Close()
	if err := os.Chmod(path, 0o660); err != nil {
		return true, fmt.Errorf("placeholder socket %s: chmod: %w", path, err)
	}
	return true, nil
}

// removePlaceholder removes the socket at path if nobody listens on it (a
// placeholder, or the dead socket of a bridge that is down: both are
// useless once the domain has stopped). The bridge's live listener, which
// accepts, is left alone.
func removePlaceholder(path string) (removed bool, err error) {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return false, nil
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return false, nil
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return false, nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("remove placeholder socket %s: %w", path, err)
	}
	return true, nil
}
