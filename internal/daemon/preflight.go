package daemon

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Checks Run makes before it opens the TPM, each turning a confusing
// failure further down (a bbolt lock timeout, a TPM that never answers)
// into one line that names the fix.

// stateLockName is the file in the state directory that a running bridge
// holds locked (flock) and that names its pid.
const stateLockName = "bridge.pid"

// lockState takes the state directory for this process: a second bridge on
// the same state would wait on the log store's lock and, on a swtpm, on
// the TPM's one connection. release unlocks it.
func lockState(dir string) (release func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	path := filepath.Join(dir, stateLockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := io.ReadAll(io.LimitReader(f, 32))
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			who := "another tpmmux-bridge"
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil && pid > 0 {
				who = fmt.Sprintf("another tpmmux-bridge (pid %d)", pid)
			}
			return nil, fmt.Errorf("%s holds %s: stop it first (systemctl stop tpmmux-bridge), or give this one another --state-dir", who, dir)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return func() { f.Close() }, nil
}

// swtpmCtrlProbeTimeout bounds the wait for swtpm's control channel to
// answer: it answers at once; a TPM data channel never answers the probe.
const swtpmCtrlProbeTimeout = 300 * time.Millisecond

// checkSwtpmPort refuses a swtpm spec that names swtpm's control channel
// (--ctrl) instead of its TPM (--server): the TPM commands would wait for
// an answer that never comes. It sends the control channel's
// CMD_GET_CAPABILITY (4 bytes), which swtpm's control channel answers with
// 8 bytes (result 0 and its capabilities); a TPM data channel waits for
// the rest of a command header and answers nothing, and the probe's
// connection is closed before the bridge's own.
func checkSwtpmPort(ctx context.Context, spec string) error {
	rest, ok := strings.CutPrefix(spec, "swtpm:")
	if !ok {
		return nil
	}
	network, addr := "tcp", rest
	if p, ok := strings.CutPrefix(rest, "unix:"); ok {
		network, addr = "unix", p
	}
	ctx, cancel := context.WithTimeout(ctx, swtpmCtrlProbeTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil // the TPM backend reports an unreachable swtpm itself
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	const cmdGetCapability = 1
	if _, err := c.Write(binary.BigEndian.AppendUint32(nil, cmdGetCapability)); err != nil {
		return nil
	}
	var rsp [8]byte
	if _, err := io.ReadFull(c, rsp[:]); err != nil {
		return nil // no answer: a TPM data channel
	}
	if bytes.Equal(rsp[:4], []byte{0, 0, 0, 0}) {
		hint := "the --server port (by swtpm's convention the control port minus one)"
		if network == "unix" {
			hint = "the --server type=unixio path"
		}
		return fmt.Errorf("--tpm %s is swtpm's control channel (--ctrl), not its TPM: use %s, e.g. swtpm:unix:/run/tpmmux-swtpm/tpm.sock", spec, hint)
	}
	return nil
}
