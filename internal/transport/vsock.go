package transport

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/mdlayher/vsock"
)

// ListenVsock listens on the host for the VM with guest CID cid, on port
// VsockPort(cid), and accepts only connections whose peer CID (as the host
// kernel reports it) is cid.
func ListenVsock(cid uint32, log *slog.Logger) (Listener, error) {
	port, err := VsockPort(cid)
	if err != nil {
		return nil, err
	}
	l, err := vsock.Listen(port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen vsock port %d for cid %d: %w (is the vhost_vsock module loaded? without /dev/vhost-vsock use virtio-serial)", port, cid, err)
	}
	return CheckCID(l, cid, VsockPeerCID, log), nil
}

// VsockPeerCID is the kernel's peer CID of a vsock connection.
func VsockPeerCID(c net.Conn) (uint32, error) {
	a, ok := c.RemoteAddr().(*vsock.Addr)
	if !ok {
		return 0, errors.New("not a vsock connection")
	}
	return a.ContextID, nil
}

// VhostVsockDevice is the device QEMU's vhost-vsock-pci needs on the host.
const VhostVsockDevice = "/dev/vhost-vsock"

// VsockAvailable reports whether this host can serve guests over AF_VSOCK
// (nil if it can). Being able to listen is not enough (a guest can listen
// too): guests reach the host only through the vhost-vsock device.
func VsockAvailable() error {
	if _, err := os.Stat(VhostVsockDevice); err != nil {
		return fmt.Errorf("AF_VSOCK unavailable: no %s (load vhost_vsock; or use virtio-serial): %w", VhostVsockDevice, err)
	}
	l, err := vsock.Listen(0, nil)
	if err != nil {
		return fmt.Errorf("AF_VSOCK unavailable: %w", err)
	}
	return l.Close()
}
