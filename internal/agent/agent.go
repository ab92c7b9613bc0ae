// Package agent is the guest side of tpmmux: it streams the guest's Linux
// IMA measurement list to the bridge on the host over one of the transports
// (AF_VSOCK, virtio-serial, a unix socket), resuming where the bridge says
// after every reconnect so that no entry is lost or sent twice, and fetches
// this VM's evidence for a verifier's nonce.
//
// The bridge, not the agent, decides where the stream resumes: the agent
// says hello with the guest's boot id, the bridge answers with the next IMA
// log index it needs, and the agent sends from there. Entries are
// acknowledged only once they are durable in the host log and folded into
// the host TPM, so an agent that dies or loses its connection simply says
// hello again.
//
// Over virtio-serial the port is the VM's only channel and only one process
// can open it, so the running agent serves local requests (evidence, key
// bindings) on a unix control socket and sends them on its own stream; see
// AttestControl and AttestAny. Over vsock and unix sockets an evidence
// request may also use a connection of its own beside the stream.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// Version is the agent version sent in Hello.
const Version = "tpmmux-agent/1"

// Defaults of Config.
const (
	DefaultIMAPath       = "/sys/kernel/security/ima/binary_runtime_measurements"
	DefaultBootIDPath    = "/proc/sys/kernel/random/boot_id"
	DefaultControlSocket = "/run/tpmmux-agent/agent.sock"
	DefaultPollInterval  = time.Second
	DefaultPingInterval  = 10 * time.Second
	DefaultPingTimeout   = 30 * time.Second
	DefaultWriteTimeout  = 30 * time.Second
	DefaultDialTimeout   = 10 * time.Second
	DefaultBackoffMin    = 250 * time.Millisecond
	DefaultBackoffMax    = 30 * time.Second
)

// ErrEnded is returned by Run when the bridge says this VM instance has
// ended (it is being torn down): there is nothing left to stream to.
var ErrEnded = errors.New("the bridge says this VM instance has ended")

// ErrNotRunning is returned by requests that need a running agent (Bind).
var ErrNotRunning = errors.New("agent is not running")

// Stream is one connection to the bridge. A stream that also has
// SetReadDeadline/SetWriteDeadline gets bounded writes.
type Stream = io.ReadWriteCloser

// Config configures an Agent. The zero value streams
// binary_runtime_measurements over vsock.
type Config struct {
	// Transport is vsock (default), virtio-serial or unix.
	Transport transport.Kind
	// UnixPath is the bridge's socket for the unix transport.
	UnixPath string
	// SerialName is the virtio-serial port name; default
	// transport.SerialPortName.
	SerialName string
	// Serial locates virtio-serial ports (its zero value uses /sys, /dev).
	Serial transport.Serial
	// Dial, if set, replaces the transport's dialer (tests, custom
	// transports). Transport still says whether the stream needs resync.
	Dial func(ctx context.Context) (Stream, error)

	// IMAPath is the binary measurement list; default DefaultIMAPath.
	IMAPath string
	// TemplateHashAlg is the algorithm of the list's template-hash column:
	// "sha1" for binary_runtime_measurements, "sha256" for the per-bank
	// binary_runtime_measurements_sha256. Default: "sha256" if IMAPath
	// ends in "_sha256", else "sha1".
	TemplateHashAlg string
	// BootIDPath is read for the guest boot id; default DefaultBootIDPath.
	BootIDPath string
	// PollInterval is how often the list is checked for new entries
	// (securityfs has no inotify); default 1 s.
	PollInterval time.Duration
	// MaxEntriesPerFrame bounds the entries in one Measurements frame
	// (the bridge's Welcome.MaxEntries also bounds it); default
	// wire.MaxEntries.
	MaxEntriesPerFrame int

	// PingInterval and PingTimeout detect a dead bridge where the
	// transport cannot (virtio-serial has no EOF): a Ping every
	// PingInterval, and a session with nothing received, or a frame not
	// acknowledged, for PingTimeout is restarted with a new Hello.
	// Defaults 10 s and 30 s. PingTimeout also bounds the wait for
	// Welcome.
	PingInterval, PingTimeout time.Duration
	// WriteTimeout bounds one write (on virtio-serial a write blocks until
	// the host end is connected); default 30 s.
	WriteTimeout time.Duration
	// BackoffMin and BackoffMax bound the exponential, jittered wait
	// between connection attempts; defaults 250 ms and 30 s.
	BackoffMin, BackoffMax time.Duration

	// ControlSocket, if set, is a unix socket (mode 0600) through which
	// local commands (tpmmux-agent attest) ask the running agent; see
	// AttestControl.
	ControlSocket string
	// AgentVersion is sent in Hello; default Version.
	AgentVersion string
	// Logger receives the agent's logs; default slog.Default().
	Logger *slog.Logger
}

// withDefaults fills in defaults and checks the configuration.
func (c Config) withDefaults() (Config, error) {
	if c.Transport == "" {
		c.Transport = transport.KindVsock
	}
	switch c.Transport {
	case transport.KindVsock, transport.KindSerial:
	case transport.KindUnix:
		if c.UnixPath == "" && c.Dial == nil {
			return c, errors.New("agent: the unix transport needs a socket path")
		}
	default:
		return c, fmt.Errorf("agent: unknown transport %q (want vsock, virtio-serial or unix)", c.Transport)
	}
	if c.SerialName == "" {
		c.SerialName = transport.SerialPortName
	}
	if c.IMAPath == "" {
		c.IMAPath = DefaultIMAPath
	}
	if c.TemplateHashAlg == "" {
		c.TemplateHashAlg = "sha1"
		if strings.HasSuffix(c.IMAPath, "_sha256") {
			c.TemplateHashAlg = "sha256"
		}
	}
	if c.TemplateHashAlg != "sha1" && c.TemplateHashAlg != "sha256" {
		return c, fmt.Errorf("agent: template hash algorithm %q: want sha1 or sha256", c.TemplateHashAlg)
	}
	if c.BootIDPath == "" {
		c.BootIDPath = DefaultBootIDPath
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.PollInterval, DefaultPollInterval)
	def(&c.PingInterval, DefaultPingInterval)
	def(&c.PingTimeout, DefaultPingTimeout)
	def(&c.WriteTimeout, DefaultWriteTimeout)
	def(&c.BackoffMin, DefaultBackoffMin)
	def(&c.BackoffMax, DefaultBackoffMax)
	c.BackoffMax = max(c.BackoffMax, c.BackoffMin)
	if c.MaxEntriesPerFrame <= 0 || c.MaxEntriesPerFrame > wire.MaxEntries {
		c.MaxEntriesPerFrame = wire.MaxEntries
	}
	if c.AgentVersion == "" {
		c.AgentVersion = Version
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c, nil
}

// Agent streams a guest's IMA list to the bridge. Run runs it; Attest and
// Bind may be called from other goroutines meanwhile.
type Agent struct {
	cfg Config
	log *slog.Logger

	// reqs carries requests that must travel on the stream session.
	reqs    chan *request
	running atomic.Bool
	// ids numbers frames and requests. It starts at a random value so that
	// a late frame of an earlier agent process cannot match.
	ids atomic.Uint64
}

// New checks cfg and returns an agent.
func New(cfg Config) (*Agent, error) {
	c, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	a := &Agent{cfg: c, log: c.Logger.With("transport", string(c.Transport)), reqs: make(chan *request)}
	a.ids.Store(rand.Uint64() >> 16)
	return a, nil
}

// Config returns the agent's configuration with defaults filled in.
func (a *Agent) Config() Config { return a.cfg }

func (a *Agent) nextID() uint64 { return a.ids.Add(1) }

// resync reports whether the transport is a byte stream without message
// boundaries.
func (a *Agent) resync() bool { return a.cfg.Transport == transport.KindSerial }

// dial opens one stream to the bridge.
func (a *Agent) dial(ctx context.Context) (Stream, error) {
	ctx, cancel := context.WithTimeout(ctx, DefaultDialTimeout)
	defer cancel()
	if a.cfg.Dial != nil {
		return a.cfg.Dial(ctx)
	}
	switch a.cfg.Transport {
	case transport.KindUnix:
		return transport.DialUnix(ctx, a.cfg.UnixPath)
	case transport.KindSerial:
		return a.cfg.Serial.Open(ctx, a.cfg.SerialName)
	default:
		return transport.DialVsock(ctx)
	}
}

// readBootID reads the guest boot id.
func readBootID(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" || len(id) > 64 {
		return "", fmt.Errorf("boot id in %s: %d bytes, want 1 to 64", path, len(id))
	}
	return id, nil
}

// Run streams the measurement list until ctx is done (it then returns nil)
// or the bridge says the VM instance has ended (an error wrapping
// ErrEnded). Connection failures are retried with backoff for ever; only a
// list that cannot be read or parsed ends Run with another error. With
// Config.ControlSocket set, Run also serves local requests.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("agent: already running")
	}
	defer a.running.Store(false)
	bootID, err := readBootID(a.cfg.BootIDPath)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	src, err := openSource(a.cfg.IMAPath, a.cfg.TemplateHashAlg)
	if err != nil {
		return fmt.Errorf("agent: %w (is securityfs mounted and IMA enabled?)", err)
	}
	defer src.close()
	if _, err := src.scan(); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if a.cfg.ControlSocket != "" {
		l, err := listenControl(a.cfg.ControlSocket)
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		cctx, cancel := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); a.serveControl(cctx, l) }()
		defer func() { cancel(); wg.Wait() }()
	}
	a.log.Info("agent started", "boot_id", bootID, "ima", a.cfg.IMAPath, "template_hash", a.cfg.TemplateHashAlg, "entries", src.known)

	bo := backoff{min: a.cfg.BackoffMin, max: a.cfg.BackoffMax}
	var carry []*request
	for {
		conn, err := a.dial(ctx)
		if err == nil {
			s := &session{a: a, conn: conn, src: src, bootID: bootID, bo: &bo, carry: carry}
			err = s.run(ctx)
			carry = s.leftover()
		}
		if ctx.Err() != nil {
			failAll(carry, ctx.Err())
			a.log.Info("agent stopped")
			return nil
		}
		switch {
		case errors.Is(err, ErrEnded):
			failAll(carry, err)
			a.log.Info("vm instance ended: agent stops", "err", err)
			return fmt.Errorf("agent: %w", err)
		case errors.Is(err, errListBroken):
			failAll(carry, err)
			return fmt.Errorf("agent: %w", err)
		}
		d := bo.next()
		a.log.Warn("bridge connection failed; retrying", "err", err, "retry_in", d.Round(time.Millisecond))
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			failAll(carry, ctx.Err())
			a.log.Info("agent stopped")
			return nil
		case <-t.C:
		}
	}
}

// backoff is an exponential backoff with jitter, bounded by max.
type backoff struct {
	min, max, cur time.Duration
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(2*b.cur, b.max)
	}
	// Full jitter on the upper half, so many agents do not retry in step.
	return b.cur/2 + rand.N(b.cur/2+1)
}

func (b *backoff) reset() { b.cur = 0 }

// Preflight checks, without connecting, that the agent can work here: the
// boot id and the measurement list are readable and the transport's device
// exists in this VM. Its errors name the alternative transport.
func (a *Agent) Preflight() error {
	if _, err := readBootID(a.cfg.BootIDPath); err != nil {
		return err
	}
	f, err := os.Open(a.cfg.IMAPath)
	if err != nil {
		return fmt.Errorf("measurement list: %w (is securityfs mounted and IMA enabled?)", err)
	}
	f.Close()
	if a.cfg.Dial != nil {
		return nil
	}
	switch a.cfg.Transport {
	case transport.KindVsock:
		if _, err := transport.GuestCID(); err != nil {
			return err
		}
	case transport.KindSerial:
		if _, err := a.cfg.Serial.Find(a.cfg.SerialName); err != nil {
			return err
		}
	}
	return nil
}
