package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/daemon"
	"github.com/tpmmux/tpmmux/libvirt"
)

// runMain is `tpmmux-bridge run`: the daemon. Flags override the
// configuration file; docs/hook.md lists every key.
func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge run",
		Synopsis: []string{"[--config FILE] [flags]"},
		Summary:  "run the bridge daemon",
		Description: `Reads /etc/tpmmux/bridge.json when it exists (a --config file must exist); the flags
override it. SIGTERM or SIGINT: stop accepting, close the listeners, commit the open batch,
exit 0.`,
	}
	fset := cmd.FlagSet()
	def := daemon.DefaultConfig()
	cfgPath := fset.String("config", daemon.DefaultConfigFile, "configuration `FILE` (JSON); a missing default file means all defaults")
	tpmSpec := fset.String("tpm", def.TPM, "the `TPM`: device[:PATH], swtpm:HOST:PORT, swtpm:unix:PATH, or sim (testing only)")
	stateDir := fset.String("state-dir", def.StateDir, "state `DIR` (log store DIR/log.db)")
	pcr := fset.Int("pcr", def.PCR, "the `PCR` the bridge owns (sha256 bank; one of 0-15)")
	insecurePCR := fset.Bool("insecure-resettable-pcr", false, "allow a PCR that can be reset without a reboot (16, 23): tests only")
	hostPCRs := fset.String("host-pcrs", def.HostPCRs, "host `PCRS` every quote covers, e.g. 0-7,10, or none")
	ctrl := fset.String("control", def.ControlSocket, "control socket `PATH` (mode 0600, root only)")
	serialDir := fset.String("serial-dir", def.SerialDir, "`DIR` of the per-VM virtio-serial sockets")
	serialGroup := fset.String("serial-group", def.SerialGroup, "`GROUP` (name or gid) of the virtio-serial sockets, so QEMU can connect")
	serialMode := fset.String("serial-mode", def.SerialMode, "`MODE` of the virtio-serial sockets, octal")
	guestUnix := fset.String("guest-unix-dir", def.GuestUnixDir, "give every VM a unix socket `DIR`/NAME.sock (development)")
	vsock := fset.String("vsock", def.Vsock, "vsock listeners: auto, on or off (`WHEN`)")
	metrics := fset.String("metrics", def.Metrics, "serve Prometheus metrics on this loopback `ADDR` (HOST:PORT)")
	level := fset.String("log-level", def.LogLevel, "log `LEVEL`: debug, info, warn or error")
	logFormat := fset.String("log-format", def.LogFormat, "log `FORMAT`: text (for the journal) or json (one object per line, for log shippers)")
	mode := fset.String("mode", def.Hook.Mode, "which domains get an identity (`MODE`): opt-out (all but those opted out) or opt-in")
	failOpen := fset.Bool("fail-open", def.Hook.FailOpen, "a prepare that fails inside the bridge lets the domain start unattested")
	libvirtTarget := fset.String("libvirt", def.Libvirt, "reconcile with libvirtd at this socket path or `URI` (empty: off)")
	host := fset.String("host", def.Host, "`NAME` of the host written into the log (default: the system's)")
	retention := fset.Duration("key-retention", time.Duration(def.KeyRetention), "destroy an ended VM's key and records after this long (0: never)")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if fset.NArg() > 0 {
		cmd.UsageError(stderr, "unexpected argument %q", fset.Arg(0))
		return cli.ExitUsage
	}
	explicit := map[string]bool{}
	fset.Visit(func(f *flag.Flag) { explicit[f.Name] = true })
	cfg, err := daemon.LoadConfig(*cfgPath, !explicit["config"])
	if err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge: %v\n", err)
		return 2
	}
	set := func(name string, apply func()) {
		if explicit[name] {
			apply()
		}
	}
	set("tpm", func() { cfg.TPM = *tpmSpec })
	set("state-dir", func() { cfg.StateDir = *stateDir })
	set("pcr", func() { cfg.PCR = *pcr })
	set("insecure-resettable-pcr", func() { cfg.InsecureResettablePCR = *insecurePCR })
	set("host-pcrs", func() { cfg.HostPCRs = *hostPCRs })
	set("control", func() { cfg.ControlSocket = *ctrl })
	set("serial-dir", func() { cfg.SerialDir = *serialDir })
	set("serial-group", func() { cfg.SerialGroup = *serialGroup })
	set("serial-mode", func() { cfg.SerialMode = *serialMode })
	set("guest-unix-dir", func() { cfg.GuestUnixDir = *guestUnix })
	set("vsock", func() { cfg.Vsock = *vsock })
	set("metrics", func() { cfg.Metrics = *metrics })
	set("log-level", func() { cfg.LogLevel = *level })
	set("log-format", func() { cfg.LogFormat = *logFormat })
	set("mode", func() { cfg.Hook.Mode = *mode })
	set("fail-open", func() { cfg.Hook.FailOpen = *failOpen })
	set("libvirt", func() { cfg.Libvirt = *libvirtTarget })
	set("host", func() { cfg.Host = *host })
	set("key-retention", func() { cfg.KeyRetention = daemon.Duration(*retention) })
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge: %v\n", err)
		return 2
	}
	log, err := daemon.NewConfiguredLogger(stderr, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge: %v\n", err)
		return 2
	}
	opts := daemon.Options{Version: version, Logger: log}
	if cfg.Libvirt != "" {
		// The hook point for libvirtd reconciliation (see
		// internal/daemon/libvirt.go): the libvirt package's watcher,
		// with the daemon as its Host.
		target := cfg.Libvirt
		opts.Libvirt = func(d *daemon.Daemon) daemon.Runner {
			return libvirt.Follow(target, d.LibvirtHost(), d.Logger())
		}
	}
	if err := daemon.Run(ctx, cfg, opts); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge: %v\n", err)
		return 1
	}
	return 0
}
