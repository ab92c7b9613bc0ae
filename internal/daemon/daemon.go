package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/vtpm"
)

// Options are what the daemon takes besides its configuration.
type Options struct {
	// Version is the bridge version written into epoch records.
	Version string
	// Logger receives the daemon's logs (default: text on stderr at the
	// configured level).
	Logger *slog.Logger
	// TPM, if set, is used instead of opening Config.TPM, and is not
	// closed by the daemon (tests keep one simulator across restarts).
	TPM tpm.TPM
	// Libvirt, if set, is the hook point for keeping the bridge in step
	// with libvirtd: it is called once the daemon is up, with the daemon
	// (whose LibvirtHost is the libvirt.Host), and the Runner it returns
	// runs until shutdown.
	// See libvirt.go.
	Libvirt func(h *Daemon) Runner
	// VsockAvailable replaces transport.VsockAvailable, the check that
	// this host can serve vsock guests (tests).
	VsockAvailable func() error
}

// Runner is a background task of the daemon that runs until ctx ends.
type Runner interface {
	Run(ctx context.Context) error
}

// Daemon is a running bridge.
type Daemon struct {
	fds     *fdStore // systemd's fd store: keeps the vTPMs' connections
	cfg     Config
	set     *settings
	opts    Options
	log     *slog.Logger
	started time.Time
	host    string

	tpm    tpm.TPM
	ownTPM bool
	store  *logstore.Store
	mux    *mux.Mux
	br     *bridge.Bridge
	mig    *migrate.Engine // live migration; nil without a migration block
	// parker holds the idle vTPMs' sockets with no goroutine each
	// (vtpm.Parker); made with the first vTPM, nil if that failed.
	parker     *vtpm.Parker
	parkerOnce sync.Once

	ctrl       *control.Server
	ctrlLn     net.Listener
	ctrlDone   chan struct{}
	metrics    *metrics
	metricsSrv *http.Server
	metricsLn  net.Listener

	vsockOn   bool
	vsockNote string

	mu  sync.Mutex
	vms map[string]*vmEntry // live VM instances by name
	// incoming are VMs migrating in, by name (migrate.go)
	incoming map[string]*incomingVM
	stops    *stopQueue // teardowns waiting for their reason
	states   stateFiles // per-VM listener state, for a restart
	// following is set when libvirt's events are followed, so a release
	// can wait for the stopped event that names the reason.
	following atomic.Bool
	closing   bool

	names    keyedMutex
	sessions atomic.Int64
	refused  atomic.Uint64 // refusals of listeners already closed
	dropped  atomic.Uint64 // connections over the per-VM limit

	bgCtx    context.Context
	bgCancel context.CancelFunc
	bg       sync.WaitGroup
	shutOnce sync.Once
	shutErr  error
}

// NoTPMError says there is no TPM device where the configuration looks.
type NoTPMError struct{ Path string }

func (e *NoTPMError) Error() string {
	return fmt.Sprintf("no TPM at %s (use --tpm swtpm:HOST:PORT for a software TPM, or --tpm sim for the in-process simulator: testing only)", e.Path)
}

// NewLogger returns the daemon's default logger: text on w at level.
func NewLogger(w io.Writer, level string) (*slog.Logger, error) {
	l, err := ParseLevel(level)
	if err != nil {
		return nil, err
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// ParseLevel parses a log level name.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("log level %q, want debug, info, warn or error", s)
	}
	return l, nil
}

// Start brings the daemon up: TPM, log store and multiplexer (with
// recovery), metrics, the listeners of every VM that is still live in the
// store (a bridge restart while VMs run), and last the control socket, so
// that a hook that reaches the bridge finds it ready. On error everything
// opened so far is closed again.
func Start(ctx context.Context, cfg Config, opts Options) (_ *Daemon, err error) {
	set, err := cfg.parse()
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		if log, err = NewLogger(os.Stderr, cfg.LogLevel); err != nil {
			return nil, err
		}
	}
	d := &Daemon{cfg: cfg, set: set, opts: opts, log: log, started: time.Now(),
		vms: make(map[string]*vmEntry), incoming: make(map[string]*incomingVM), fds: newFDStore(log)}
	d.stops = newStopQueue(&d.names, d.endInstance)
	d.states = stateFiles{dir: filepath.Join(cfg.StateDir, "vms"), log: log}
	d.bgCtx, d.bgCancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			d.teardownStart()
		}
	}()
	d.host = cfg.Host
	if d.host == "" {
		d.host, _ = os.Hostname()
	}

	if err := d.openCore(ctx); err != nil {
		return nil, err
	}
	st := d.mux.Status()
	if st.Fault != "" {
		log.Error("the bridge will not give VMs identities or serve evidence until an operator resolves this", "fault", st.Fault)
	}
	quota, _ := cfg.Quota.Bridge() // checked by parse
	d.br = &bridge.Bridge{Mux: d.mux, Log: log, VTPMBanks: bankIDs(set.vtpmBanks), Quota: quota}

	d.decideVsock()
	if set.metrics != "" {
		if err := d.startMetrics(set.metrics); err != nil {
			return nil, err
		}
	}
	if err := d.startMigration(); err != nil {
		return nil, err
	}
	d.restoreLive(ctx)
	d.resumeIncoming()
	d.fds.leftovers()
	if err := d.serveControl(); err != nil {
		return nil, err
	}
	d.startBackground()
	if err := d.fds.notify("READY=1"); err != nil {
		log.Warn("could not tell systemd the bridge is ready", "err", err)
	}
	log.Info("tpmmux bridge ready", "version", opts.Version, "tpm", d.tpmName(), "epoch", st.Epoch, "pcr", st.PCR,
		"live_vms", st.LiveVMs, "control", cfg.ControlSocket, "vsock", d.vsockOn, "metrics", d.MetricsAddr())
	return d, nil
}

// openCore opens the TPM, the state directory's log store and the
// multiplexer (which recovers from them).
func (d *Daemon) openCore(ctx context.Context) (err error) {
	cfg := d.cfg
	// The TPM first: without one nothing else matters, and a missing
	// device gets its one clear line before anything is logged.
	if d.opts.TPM != nil {
		d.tpm = d.opts.TPM
	} else {
		if err := checkDevice(cfg.TPM); err != nil {
			return err
		}
		if d.tpm, err = tpm.Open(ctx, cfg.TPM); err != nil {
			return err
		}
		d.ownTPM = true
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if err := os.Chmod(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if d.store, err = logstore.Open(storePath(cfg.StateDir), nil); err != nil {
		return fmt.Errorf("log store: %w", err)
	}
	d.metrics = newMetrics(d)
	d.mux, err = mux.Open(ctx, d.tpm, d.store, mux.Config{
		PCR: cfg.PCR, InsecureResettablePCR: cfg.InsecureResettablePCR, HostPCRs: d.set.hostPCRs, Host: d.host, Version: d.opts.Version,
		Logger: d.log, Observer: d.metrics, KeyRetention: time.Duration(cfg.KeyRetention), Cover: d.set.cover,
	})
	if err != nil {
		return fmt.Errorf("multiplexer: %w", err)
	}
	return nil
}

// serveControl opens the control socket and serves it.
func (d *Daemon) serveControl() error {
	ln, err := control.Listen(d.cfg.ControlSocket)
	if err != nil {
		return err
	}
	d.ctrlLn = ln
	d.ctrl = &control.Server{Handler: controlHandler{d}, Log: d.log, Timeout: time.Duration(d.cfg.ControlTimeout)}
	d.ctrlDone = make(chan struct{})
	go func() {
		defer close(d.ctrlDone)
		d.ctrl.Serve(ln)
	}()
	return nil
}

// startBackground starts the key retention loop and libvirt
// reconciliation, when configured; Shutdown stops them.
func (d *Daemon) startBackground() {
	if d.cfg.KeyRetention > 0 {
		d.bg.Add(1)
		go d.retentionLoop()
	}
	if d.opts.Libvirt == nil {
		return
	}
	r := d.opts.Libvirt(d)
	if r == nil {
		return
	}
	d.following.Store(true)
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		if err := r.Run(d.bgCtx); err != nil && !errors.Is(err, context.Canceled) {
			d.log.Error("libvirt reconciliation stopped", "err", err)
		}
	}()
}

func storePath(stateDir string) string { return stateDir + "/log.db" }

// checkDevice fails with a NoTPMError when spec names a TPM device node
// that does not exist.
func checkDevice(spec string) error {
	kind, arg, _ := strings.Cut(spec, ":")
	if kind != "device" {
		return nil
	}
	path := arg
	if path == "" {
		path = "/dev/tpmrm0"
	}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return &NoTPMError{Path: path}
	}
	return nil
}

func (d *Daemon) tpmName() string {
	if d.opts.TPM != nil {
		return "injected"
	}
	return d.cfg.TPM
}

func (d *Daemon) decideVsock() {
	// transport.VsockAvailable wants /dev/vhost-vsock too: inside a VM
	// AF_VSOCK listens (towards its own host), but no guest of this host
	// could connect.
	avail := transport.VsockAvailable
	if d.opts.VsockAvailable != nil {
		avail = d.opts.VsockAvailable
	}
	switch d.cfg.Vsock {
	case "off":
		d.vsockNote = "off in the configuration"
	case "on", "auto":
		if err := avail(); err != nil {
			d.vsockNote = err.Error()
			if d.cfg.Vsock == "on" {
				d.log.Error("vsock is on in the configuration but unavailable: VMs get no vsock listener", "err", err)
			} else {
				d.log.Info("vsock unavailable on this host: VMs use virtio-serial", "err", err)
			}
			return
		}
		d.vsockOn = true
	}
}

// Run starts the daemon, serves until ctx ends (SIGTERM, SIGINT) and then
// shuts it down cleanly.
func Run(ctx context.Context, cfg Config, opts Options) error {
	release, err := lockState(cfg.StateDir)
	if err != nil {
		return err
	}
	defer release()
	if opts.TPM == nil {
		if err := checkSwtpmPort(ctx, cfg.TPM); err != nil {
			return err
		}
	}
	d, err := Start(ctx, cfg, opts)
	if err != nil {
		return err
	}
	<-ctx.Done()
	d.log.Info("shutting down", "cause", context.Cause(ctx))
	return d.Shutdown()
}

// Shutdown stops accepting control requests and guest connections, closes
// every listener, lets the sessions settle, records the teardowns still
// waiting for "release end", lets the multiplexer commit its queued batch,
// and closes the store and the TPM. It is idempotent.
func (d *Daemon) Shutdown() error {
	d.shutOnce.Do(func() {
		start := time.Now()
		var errs []error
		d.mu.Lock()
		d.closing = true
		d.mu.Unlock()
		if d.ctrl != nil {
			d.ctrl.Close()
			<-d.ctrlDone
		}
		d.bgCancel()
		d.bg.Wait()
		d.stops.flush()
		d.closeAllVMs()
		d.parkerOnce.Do(func() {}) // after any vtpmParker
		if d.parker != nil {
			d.parker.Close()
		}
		if d.metricsSrv != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			d.metricsSrv.Shutdown(sctx)
			cancel()
		}
		st := d.mux.Status()
		if err := d.mux.Close(); err != nil {
			errs = append(errs, err)
		}
		if err := d.store.Close(); err != nil {
			errs = append(errs, err)
		}
		if d.ownTPM {
			if err := d.tpm.Close(); err != nil {
				errs = append(errs, err)
			}
		}
		d.shutErr = errors.Join(errs...)
		d.log.Info("tpmmux bridge stopped", "epoch", st.Epoch, "batches", st.Batches, "entries", st.Entries,
			"pcr_value", fmt.Sprintf("%x", st.PCRValue), "elapsed", time.Since(start).Round(time.Millisecond), "err", d.shutErr)
	})
	return d.shutErr
}

// teardownStart closes what a failed Start opened.
func (d *Daemon) teardownStart() {
	d.bgCancel()
	if d.ctrl != nil {
		d.ctrl.Close()
	} else if d.ctrlLn != nil {
		d.ctrlLn.Close()
	}
	d.closeAllVMs()
	if d.metricsSrv != nil {
		d.metricsSrv.Close()
	}
	if d.mux != nil {
		d.mux.Close()
	}
	if d.store != nil {
		d.store.Close()
	}
	if d.ownTPM && d.tpm != nil {
		d.tpm.Close()
	}
}

// Mux is the daemon's multiplexer.
func (d *Daemon) Mux() *mux.Mux { return d.mux }

// Logger is the daemon's logger.
func (d *Daemon) Logger() *slog.Logger { return d.log }

// Config is the daemon's configuration.
func (d *Daemon) Config() Config { return d.cfg }

// MetricsAddr is the metrics endpoint's address ("" when off).
func (d *Daemon) MetricsAddr() string {
	if d.metricsLn == nil {
		return ""
	}
	return d.metricsLn.Addr().String()
}

// keyedMutex serializes the lifecycle operations of one domain name while
// letting other domains' run in parallel (hashing one domain's launch
// files must not hold up another's start).
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) Lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = make(map[string]*keyedEntry)
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		e.refs--
		if e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

// retentionInterval is how often ended VMs past their key retention are
// forgotten.
const retentionInterval = 10 * time.Minute

func (d *Daemon) retentionLoop() {
	defer d.bg.Done()
	t := time.NewTicker(min(retentionInterval, max(time.Duration(d.cfg.KeyRetention)/4, time.Second)))
	defer t.Stop()
	for {
		if n, err := d.mux.ForgetExpired(time.Now()); err != nil {
			d.log.Error("key retention", "err", err)
		} else if n > 0 {
			d.log.Info("ended VMs forgotten after their key retention", "count", n)
		}
		select {
		case <-d.bgCtx.Done():
			return
		case <-t.C:
		}
	}
}
