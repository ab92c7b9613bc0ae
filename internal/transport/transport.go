// Package transport holds the byte-stream transports between guest agents
// and the bridge: AF_VSOCK (per-VM port, peer CID checked), virtio-serial
// (the host end is a per-VM unix socket QEMU connects to, so the path names
// the VM; a stream without message boundaries, so the wire reader
// resynchronizes) and plain unix sockets (development). Each listener
// belongs to one VM: which VM a connection speaks for is decided here, by
// the transport, never by anything the guest sends.
package transport

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
)

// Kind names a transport.
type Kind string

// The transports.
const (
	KindVsock  Kind = "vsock"
	KindSerial Kind = "virtio-serial"
	KindUnix   Kind = "unix"
)

// HostCID is the vsock CID of the host, which guests dial.
const HostCID = 2

// VsockPortBase is the base of the per-VM vsock port scheme: the bridge
// listens for the VM with guest CID c on port VsockPortBase+c, and the
// agent, which can read its own CID, dials that port on the host: no guest
// configuration is needed.
const VsockPortBase = 1 << 24

// MaxVsockCID is the largest guest CID the port scheme covers. Its port is
// 2^32-2: port 2^32-1 is VMADDR_PORT_ANY, on which a listener binds a
// random port instead (seen on a real vsock stack, scripts/vmtest).
const MaxVsockCID = 1<<32 - 2 - VsockPortBase

// VsockPort returns the host port the VM with guest CID cid uses.
func VsockPort(cid uint32) (uint32, error) {
	if cid < 3 || cid > MaxVsockCID {
		return 0, fmt.Errorf("guest cid %d outside 3..%d", cid, uint32(MaxVsockCID))
	}
	return VsockPortBase + cid, nil
}

// Listener accepts guest connections for one VM.
type Listener interface {
	// Accept waits for the next guest connection that passed the
	// transport's peer checks.
	Accept() (net.Conn, error)
	// Close stops listening (and removes a socket file it created).
	Close() error
	// Kind says which transport this is.
	Kind() Kind
	// Resync reports whether the stream has no message boundaries, so the
	// wire reader must resynchronize.
	Resync() bool
	// Addr describes where it listens.
	Addr() string
	// Refused counts connections refused by a peer check.
	Refused() uint64
}

// ListenUnix listens on a unix socket at path, mode 0600: the development
// transport, and the one tests drive.
func ListenUnix(path string) (Listener, error) {
	l, err := listenUnixMode(path, 0o600, -1)
	if err != nil {
		return nil, err
	}
	return &streamListener{Listener: l, kind: KindUnix, path: path}, nil
}

// ListenSerial listens on the host end of a VM's virtio-serial channel: a
// unix socket at path that QEMU connects to (<channel type='unix'><source
// mode='connect' path=…>). It must exist before QEMU starts, so the bridge
// creates it at prepare. mode and gid (-1: leave) let QEMU's user connect;
// with libvirt's default DAC labelling that is group libvirt-qemu, mode 0660.
func ListenSerial(path string, mode os.FileMode, gid int) (Listener, error) {
	l, err := listenUnixMode(path, mode, gid)
	if err != nil {
		return nil, err
	}
	return &streamListener{Listener: l, kind: KindSerial, path: path, resync: true}, nil
}

func listenUnixMode(path string, mode os.FileMode, gid int) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: exists and is not a socket", path)
		}
		// A stale socket of an earlier bridge: nobody can be listening on it
		// but us, since the bridge owns its socket directory.
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("listen %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen %s: chmod: %w", path, err)
	}
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			l.Close()
			return nil, fmt.Errorf("listen %s: chown: %w", path, err)
		}
	}
	return l, nil
}

type streamListener struct {
	net.Listener
	kind   Kind
	path   string
	resync bool
}

func (l *streamListener) Kind() Kind      { return l.kind }
func (l *streamListener) Resync() bool    { return l.resync }
func (l *streamListener) Addr() string    { return l.path }
func (l *streamListener) Refused() uint64 { return 0 }

// CIDOf returns the vsock CID of a connection's peer. The vsock transport
// uses the kernel's answer; tests substitute their own over unix sockets.
type CIDOf func(net.Conn) (uint32, error)

// ErrPeerCID is the reason a connection was refused: its peer CID is not
// the VM's.
var ErrPeerCID = errors.New("peer CID does not match the VM")

// CheckCID wraps a listener so that Accept returns only connections whose
// peer CID is want; others are closed, counted and logged. This is the
// whole of vsock's per-VM check, kept separate so that tests can drive it
// where AF_VSOCK is not available.
func CheckCID(inner net.Listener, want uint32, cidOf CIDOf, log *slog.Logger) *CIDListener {
	if log == nil {
		log = slog.Default()
	}
	return &CIDListener{inner: inner, want: want, cidOf: cidOf, log: log}
}

// CIDListener is a listener whose connections passed the peer-CID check.
type CIDListener struct {
	inner   net.Listener
	want    uint32
	cidOf   CIDOf
	log     *slog.Logger
	refused atomic.Uint64
	closed  atomic.Bool
	kind    Kind
}

// Accept returns the next connection from the expected CID.
func (l *CIDListener) Accept() (net.Conn, error) {
	for {
		c, err := l.inner.Accept()
		if err != nil {
			if l.closed.Load() && !errors.Is(err, net.ErrClosed) {
				// mdlayher/vsock reports an Accept that Close interrupts
				// as EBADF (mdlayher/vsock#50); accept loops stop on
				// net.ErrClosed.
				return nil, fmt.Errorf("%w: %v", net.ErrClosed, err)
			}
			return nil, err
		}
		cid, err := l.cidOf(c)
		if err == nil && cid == l.want {
			return c, nil
		}
		l.refused.Add(1)
		if err == nil {
			err = fmt.Errorf("%w: peer cid %d, vm cid %d", ErrPeerCID, cid, l.want)
		}
		l.log.Warn("refused guest connection", "listener", l.inner.Addr().String(), "err", err)
		c.Close()
	}
}

// Close stops listening; a pending or later Accept returns an error that
// is net.ErrClosed.
func (l *CIDListener) Close() error {
	l.closed.Store(true)
	return l.inner.Close()
}

// Kind is vsock (or what a test set).
func (l *CIDListener) Kind() Kind {
	if l.kind == "" {
		return KindVsock
	}
	return l.kind
}

// Resync is false: vsock is a reliable stream.
func (l *CIDListener) Resync() bool { return false }

// Addr describes the listening address.
func (l *CIDListener) Addr() string { return l.inner.Addr().String() }

// Refused counts connections refused for their peer CID.
func (l *CIDListener) Refused() uint64 { return l.refused.Load() }
