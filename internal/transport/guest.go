package transport

// The guest side of the transports: what the agent inside a VM uses to reach
// the bridge. None of it needs cgo, so the agent builds as a static binary.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"
)

// SerialPortName is the name of the virtio-serial port the bridge's
// channel uses (libvirt <channel type='unix'><target type='virtio'
// name='org.tpmmux.0'/>).
const SerialPortName = "org.tpmmux.0"

// ErrNoSerialPort is returned when no virtio-serial port has the name asked
// for.
var ErrNoSerialPort = errors.New("no virtio-serial port with that name")

// DialVsock connects from inside a guest to the bridge over AF_VSOCK: it
// reads the guest's own CID from /dev/vsock and dials the host (CID
// HostCID) on VsockPort(cid), the port the bridge listens on for this VM.
// The stream is reliable: the wire reader needs no resync.
func DialVsock(ctx context.Context) (net.Conn, error) {
	return dialVsock(ctx, GuestCID, HostCID)
}

// dialVsock is DialVsock with the CID source and the host CID as
// parameters, so tests can dial a loopback listener.
func dialVsock(ctx context.Context, localCID func() (uint32, error), host uint32) (net.Conn, error) {
	cid, err := localCID()
	if err != nil {
		return nil, err
	}
	port, err := VsockPort(cid)
	if err != nil {
		return nil, fmt.Errorf("vsock: %w", err)
	}
	c, err := vsock.DialContext(ctx, host, port, nil)
	if err != nil {
		return nil, fmt.Errorf("vsock: dial cid %d port %d: %w (is the bridge serving this VM?)", host, port, err)
	}
	return c, nil
}

// DialUnix connects to a bridge listening on a unix socket at path: the
// development transport.
func DialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("unix: dial %s: %w", path, err)
	}
	return c, nil
}

// SerialPort is a virtio-serial port found in sysfs.
type SerialPort struct {
	// Name is the port's name (from the channel's target name).
	Name string
	// Port is the kernel's device name, e.g. "vport1p1".
	Port string
	// Dev is the device node path, e.g. "/dev/vport1p1".
	Dev string
	// Major and Minor are the device numbers sysfs reports.
	Major, Minor uint32
}

// Serial finds and opens the guest end of virtio-serial ports. The zero
// value uses the real /sys and /dev; tests point the roots at a fake tree.
type Serial struct {
	// SysRoot is the sysfs mount point; "" means /sys.
	SysRoot string
	// DevRoot is the device directory; "" means /dev.
	DevRoot string
}

func (s Serial) sysRoot() string {
	if s.SysRoot == "" {
		return "/sys"
	}
	return s.SysRoot
}

func (s Serial) devRoot() string {
	if s.DevRoot == "" {
		return "/dev"
	}
	return s.DevRoot
}

// OpenSerial finds the virtio-serial port called name under /sys and opens
// its device read-write (see [Serial.Open]).
func OpenSerial(ctx context.Context, name string) (*SerialConn, error) {
	return Serial{}.Open(ctx, name)
}

// Find looks for the port called name in SysRoot/class/virtio-ports/*/name
// and reads its device numbers from the port's dev file.
func (s Serial) Find(name string) (SerialPort, error) {
	dir := filepath.Join(s.sysRoot(), "class", "virtio-ports")
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return SerialPort{}, fmt.Errorf("virtio-serial: %s: %w (no virtio-serial device: the VM has no <channel>; use --transport vsock)", dir, ErrNoSerialPort)
		}
		return SerialPort{}, fmt.Errorf("virtio-serial: list ports: %w", err)
	}
	var seen []string
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "name"))
		if err != nil {
			continue // a port without a name file has no name
		}
		got := strings.TrimRight(string(b), "\n\x00")
		if got == "" {
			continue
		}
		seen = append(seen, got)
		if got != name {
			continue
		}
		p := SerialPort{Name: name, Port: e.Name(), Dev: filepath.Join(s.devRoot(), e.Name())}
		d, err := os.ReadFile(filepath.Join(dir, e.Name(), "dev"))
		if err != nil {
			return SerialPort{}, fmt.Errorf("virtio-serial: port %s: %w", e.Name(), err)
		}
		if p.Major, p.Minor, err = parseDevNumbers(string(d)); err != nil {
			return SerialPort{}, fmt.Errorf("virtio-serial: port %s: dev %q: %w", e.Name(), strings.TrimSpace(string(d)), err)
		}
		return p, nil
	}
	return SerialPort{}, fmt.Errorf("virtio-serial: %q among ports %q: %w (is the VM's <channel> named %s? otherwise use --transport vsock)", name, seen, ErrNoSerialPort, name)
}

// parseDevNumbers parses a sysfs dev file, "major:minor\n".
func parseDevNumbers(s string) (major, minor uint32, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		return 0, 0, errors.New("not major:minor")
	}
	ma, err := strconv.ParseUint(a, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("major: %w", err)
	}
	mi, err := strconv.ParseUint(b, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("minor: %w", err)
	}
	return uint32(ma), uint32(mi), nil
}

// nodeAction is what EnsureNode must do about a port's device node.
type nodeAction int

const (
	nodeOK     nodeAction = iota // a char device with the right numbers
	nodeCreate                   // missing: mknod it
)

// checkNode decides, from an Lstat of the node, whether it can be used as
// it is or must be created. A node that exists but is something else is an
// error: the agent does not replace what it did not make.
func checkNode(p SerialPort, fi os.FileInfo, statErr error) (nodeAction, error) {
	if statErr != nil {
		if errors.Is(statErr, fs.ErrNotExist) {
			return nodeCreate, nil
		}
		return 0, fmt.Errorf("virtio-serial: stat %s: %w", p.Dev, statErr)
	}
	if fi.Mode()&fs.ModeCharDevice == 0 || fi.Mode()&fs.ModeDevice == 0 {
		return 0, fmt.Errorf("virtio-serial: %s exists and is not a character device (%s)", p.Dev, fi.Mode().Type())
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nodeOK, nil
	}
	if ma, mi := unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev)); ma != p.Major || mi != p.Minor {
		return 0, fmt.Errorf("virtio-serial: %s is device %d:%d, sysfs says port %s is %d:%d", p.Dev, ma, mi, p.Port, p.Major, p.Minor)
	}
	return nodeOK, nil
}

// EnsureNode makes sure the port's device node exists. Without udev (a
// minimal guest, an initramfs) /dev/vportNpM may be missing: it is then
// created from the numbers sysfs gave, mode 0600. It reports whether it
// created the node.
func (s Serial) EnsureNode(p SerialPort) (created bool, err error) {
	fi, serr := os.Lstat(p.Dev)
	act, err := checkNode(p, fi, serr)
	if err != nil || act == nodeOK {
		return false, err
	}
	if err := unix.Mknod(p.Dev, unix.S_IFCHR|0o600, int(unix.Mkdev(p.Major, p.Minor))); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Someone (udev) made it meanwhile: check what they made.
			fi, serr := os.Lstat(p.Dev)
			_, err := checkNode(p, fi, serr)
			return false, err
		}
		return false, fmt.Errorf("virtio-serial: mknod %s (%d:%d): %w", p.Dev, p.Major, p.Minor, err)
	}
	return true, nil
}

// Open finds the port called name, creates its device node if needed, and
// opens it read-write. The stream it returns has no message boundaries and
// no EOF, so the wire reader must resynchronize (resync = true).
//
// What the guest end of a virtio-serial port does (seen with QEMU/TCG
// guests): a write blocks until the host end is connected; bytes the host
// sends while the guest has the port closed are dropped; the host sees no
// EOF when the guest closes. Only one process can hold a port open.
func (s Serial) Open(ctx context.Context, name string) (*SerialConn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := s.Find(name)
	if err != nil {
		return nil, err
	}
	if _, err := s.EnsureNode(p); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(p.Dev, os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("virtio-serial: open %s (port %s): %w (another process holds the port: is tpmmux-agent already running?)", p.Dev, name, err)
		}
		return nil, fmt.Errorf("virtio-serial: open %s (port %s): %w", p.Dev, name, err)
	}
	return newSerialConn(f, p), nil
}

// serialFile is what a SerialConn needs of its device: an *os.File.
type serialFile interface {
	io.ReadWriteCloser
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// hostWait is how long a read waits before asking again while the host end
// of the port is not connected (the kernel then reports end of file).
const hostWait = 100 * time.Millisecond

// SerialConn is an open virtio-serial port. Reads never report end of
// file: while the host end is not connected the kernel returns 0 bytes, and
// the read waits and asks again, since the host may connect later. Close
// unblocks a pending Read or Write.
type SerialConn struct {
	f    serialFile
	port SerialPort

	mu     sync.Mutex
	rdl    time.Time
	closed chan struct{}
	once   sync.Once
}

func newSerialConn(f serialFile, p SerialPort) *SerialConn {
	return &SerialConn{f: f, port: p, closed: make(chan struct{})}
}

// Port describes the port.
func (c *SerialConn) Port() SerialPort { return c.port }

// Read reads from the port, waiting while the host end is not connected.
func (c *SerialConn) Read(b []byte) (int, error) {
	for {
		n, err := c.f.Read(b)
		if n > 0 || len(b) == 0 {
			return n, nil
		}
		if err != nil && !errors.Is(err, io.EOF) {
			select {
			case <-c.closed:
				return 0, net.ErrClosed
			default:
			}
			return 0, fmt.Errorf("virtio-serial %s: read: %w", c.port.Name, err)
		}
		// No host: wait, unless closed or past the read deadline.
		c.mu.Lock()
		dl := c.rdl
		c.mu.Unlock()
		wait := hostWait
		if !dl.IsZero() {
			left := time.Until(dl)
			if left <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			wait = min(wait, left)
		}
		t := time.NewTimer(wait)
		select {
		case <-c.closed:
			t.Stop()
			return 0, net.ErrClosed
		case <-t.C:
		}
	}
}

// Write writes to the port; it blocks while the host end is not connected.
func (c *SerialConn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	if err != nil {
		return n, fmt.Errorf("virtio-serial %s: write: %w", c.port.Name, err)
	}
	return n, nil
}

// Close closes the port (the host sees nothing).
func (c *SerialConn) Close() error {
	var err error
	c.once.Do(func() {
		close(c.closed)
		err = c.f.Close()
	})
	return err
}

// SetReadDeadline bounds pending and future reads.
func (c *SerialConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.rdl = t
	c.mu.Unlock()
	if err := c.f.SetReadDeadline(t); err != nil && !errors.Is(err, os.ErrNoDeadline) {
		return err
	}
	return nil
}

// SetWriteDeadline bounds pending and future writes (a write that waits for
// the host end).
func (c *SerialConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// SetDeadline sets both deadlines.
func (c *SerialConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// GuestCID returns this guest's own vsock CID, as /dev/vsock reports it.
// It fails where the VM has no vsock device.
func GuestCID() (uint32, error) {
	cid, err := vsock.ContextID()
	if err != nil {
		return 0, fmt.Errorf("vsock: read this guest's CID: %w (no /dev/vsock: the VM has no vhost-vsock device; use --transport virtio-serial)", err)
	}
	return cid, nil
}
