package libvirt

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"

	"github.com/tpmmux/tpmmux/internal/await"
)

// DefaultSocket is libvirtd's read-write unix socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// DefaultDialTimeout bounds dialing libvirtd's socket when ctx has no
// earlier deadline.
const DefaultDialTimeout = 15 * time.Second

// Client is a connection to libvirtd (qemu:///system unless the target URI
// says otherwise), over libvirt's RPC protocol with
// github.com/digitalocean/go-libvirt: no libvirt C library is needed.
//
// The bridge daemon uses it; the hook never does (libvirt forbids calling
// its API from a hook: the call would deadlock).
type Client struct {
	l      *golibvirt.Libvirt
	target string
}

// Connect connects to libvirtd. target is "" (the local socket
// DefaultSocket), a socket path (starting with "/"), or a libvirt URI such
// as qemu:///system or qemu+unix:///system?socket=/path (see go-libvirt's
// ConnectToURI for the transports).
func Connect(ctx context.Context, target string) (*Client, error) {
	timeout := await.Timeout(ctx, DefaultDialTimeout)
	if timeout <= 0 {
		return nil, fmt.Errorf("connect to libvirtd %q: %w", target, context.DeadlineExceeded)
	}
	var dial func() (*golibvirt.Libvirt, error)
	switch {
	case target == "" || strings.HasPrefix(target, "/"):
		sock := target
		if sock == "" {
			sock = DefaultSocket
		}
		dial = func() (*golibvirt.Libvirt, error) {
			l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(sock), dialers.WithLocalTimeout(timeout)))
			if err := l.ConnectToURI(golibvirt.QEMUSystem); err != nil {
				return nil, err
			}
			return l, nil
		}
	default:
		u, err := url.Parse(target)
		if err != nil || u.Scheme == "" {
			return nil, fmt.Errorf("connect to libvirtd: %q is neither a socket path nor a libvirt URI", target)
		}
		dial = func() (*golibvirt.Libvirt, error) { return golibvirt.ConnectToURI(u) }
	}
	l, err := await.DoOr(ctx, dial, func(l *golibvirt.Libvirt) {
		_ = l.Disconnect() // it came up after all
	})
	if err != nil {
		return nil, fmt.Errorf("connect to libvirtd %q: %w", target, err)
	}
	return &Client{l: l, target: target}, nil
}

// Libvirt is the underlying go-libvirt connection, e.g. for
// qemu.NewLibvirtMonitor. Its calls take no context.
func (c *Client) Libvirt() *golibvirt.Libvirt { return c.l }

// Disconnected is closed when the connection to libvirtd is lost (libvirtd
// stopped or restarted) or closed.
func (c *Client) Disconnected() <-chan struct{} { return c.l.Disconnected() }

// Close closes the connection.
func (c *Client) Close() error {
	if err := c.l.Disconnect(); err != nil {
		return fmt.Errorf("disconnect from libvirtd %q: %w", c.target, err)
	}
	return nil
}

// DomainInfo is a running domain as libvirtd reports it.
type DomainInfo struct {
	Name string
	UUID [16]byte
	ID   int32  // libvirt's domain id, new on every start
	XML  []byte // the live domain XML
}

// Parse parses the domain's XML.
func (d DomainInfo) Parse() (*Domain, error) { return ParseDomain(d.XML) }

// RunningDomains lists the active domains (running or paused) with their
// live XML. A domain that stops while the list is read is left out.
func (c *Client) RunningDomains(ctx context.Context) ([]DomainInfo, error) {
	doms, err := await.Do(ctx, func() ([]golibvirt.Domain, error) {
		d, _, err := c.l.ConnectListAllDomains(1, golibvirt.ConnectListDomainsActive)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("list running domains: %w", err)
	}
	out := make([]DomainInfo, 0, len(doms))
	for _, d := range doms {
		x, err := await.Do(ctx, func() (string, error) { return c.l.DomainGetXMLDesc(d, 0) })
		if golibvirt.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list running domains: XML of %s: %w", d.Name, err)
		}
		out = append(out, DomainInfo{Name: d.Name, UUID: d.UUID, ID: d.ID, XML: []byte(x)})
	}
	return out, nil
}
