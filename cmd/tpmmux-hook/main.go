// Command tpmmux-hook is tpmmux's libvirt qemu hook, installed as
// /etc/libvirt/hooks/qemu.d/tpmmux (libvirt ≥ 6.5 runs every executable
// there). libvirt runs it with argv DOMAIN OP SUBOP EXTRA and the domain
// XML on stdin; it forwards the lifecycle events tpmmux needs to the
// bridge's control socket and never calls the libvirt API (libvirt forbids
// that from a hook: it would deadlock).
//
//	migrate begin    (destination of a live migration) the VM's identity is
//	                 reserved at the source bridge; stdout stays empty (the
//	                 XML is not changed)
//	prepare begin    identity and genesis (an incoming VM: its listeners
//	                 only, the identity comes with the handover)
//	started begin    the live XML (auto-assigned vsock CID)
//	stopped end      listeners close; teardown follows
//	release end      teardown with libvirt's shutoff reason (EXTRA)
//	reconnect begin  libvirtd restarted: re-adopt the running VM
//	anything else    exit 0 at once, stdin unread
//
// Its own configuration is /etc/tpmmux/hook.json (or $TPMMUX_HOOK_CONFIG):
// {"control_socket", "timeout", "fail_open", "mode"}; see docs/hook.md.
// Every path takes at most the timeout (2 s by default). Fail-closed by
// default: when migrate, prepare or started gets no good answer in time the hook
// exits 1 with one line on stderr, which virsh shows, and libvirt does not
// start the domain. stopped, release and reconnect never fail.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/await"
	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/jsonconf"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Defaults of the hook's configuration.
const (
	DefaultConfigPath = "/etc/tpmmux/hook.json"
	DefaultTimeout    = 2 * time.Second
	DefaultSerialDir  = "/run/tpmmux/serial"
	configEnv         = "TPMMUX_HOOK_CONFIG"
)

// config is /etc/tpmmux/hook.json.
type config struct {
	// ControlSocket is the bridge's control socket.
	ControlSocket string `json:"control_socket"`
	// Timeout bounds the whole hook run, e.g. "2s".
	Timeout string `json:"timeout"`
	// FailOpen lets a domain start when the bridge does not answer (or
	// refuses): it then runs unattested.
	FailOpen bool `json:"fail_open"`
	// Mode is opt-out (every domain unless its metadata says
	// enabled="no") or opt-in (only domains whose metadata says
	// enabled="yes").
	Mode string `json:"mode"`
	// SerialDir is the bridge's serial_dir: a domain that starts without
	// the bridge gets a placeholder for its org.tpmmux.0 socket there.
	SerialDir string `json:"serial_dir"`

	timeout time.Duration
	path    string
}

func loadConfig() (*config, error) {
	path := os.Getenv(configEnv)
	if path == "" {
		path = DefaultConfigPath
	}
	c := &config{ControlSocket: control.DefaultSocket, Mode: "opt-out", SerialDir: DefaultSerialDir, timeout: DefaultTimeout, path: path}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	if err := jsonconf.Decode(path, b, c); err != nil {
		return c, err
	}
	if c.ControlSocket == "" {
		c.ControlSocket = control.DefaultSocket
	}
	if c.SerialDir == "" {
		c.SerialDir = DefaultSerialDir
	}
	if c.Timeout != "" {
		t, err := time.ParseDuration(c.Timeout)
		if err != nil || t <= 0 || t > time.Minute {
			return c, fmt.Errorf("%s: timeout %q, want a duration such as \"2s\" (at most 1m)", path, c.Timeout)
		}
		c.timeout = t
	}
	switch c.Mode {
	case "":
		c.Mode = "opt-out"
	case "opt-out", "opt-in":
	default:
		return c, fmt.Errorf("%s: mode %q, want opt-out or opt-in", path, c.Mode)
	}
	return c, nil
}

func main() {
	if code, ok := helpOrVersion(os.Args[1:], os.Stdout, os.Stderr); ok {
		os.Exit(code)
	}
	os.Exit(run(os.Args[1:], os.Stdin, os.Stderr))
}

// command describes the hook: the source of its --help and man page.
func command() *cli.Command {
	return &cli.Command{
		Name:       "tpmmux-hook",
		Synopsis:   []string{"DOMAIN OP SUBOP [EXTRA] < domain.xml"},
		Summary:    "the libvirt qemu hook of tpmmux",
		ManSection: 8,
		Description: `Installed as /etc/libvirt/hooks/qemu.d/tpmmux; libvirt (6.5 or later) runs it at every domain
lifecycle step with the domain XML on stdin, and libvirtd looks for hooks only when it starts:
restart libvirtd once after installing it. It forwards the steps tpmmux needs to the bridge's
control socket and never calls the libvirt API:

  migrate begin    destination of a live migration: the VM's identity is reserved at the source
                   bridge (docs/migration.md); a failure cancels the migration; stdout stays empty
  prepare begin    identity and genesis; the VM's listeners open (an incoming VM: listeners only,
                   its identity arrives with the handover)
  started begin    the live XML (auto-assigned vsock CID)
  stopped end      listeners close; teardown follows
  release end      teardown with libvirt's shutoff reason (EXTRA)
  reconnect begin  libvirtd restarted: re-adopt the running VM
  anything else    exit 0 at once, stdin unread

Fail-closed by default: when migrate, prepare or started gets no good answer within the timeout the hook
exits 1 with one line on stderr, which virsh shows, and libvirt does not start the domain.
stopped, release and reconnect never fail. A domain that starts without the bridge (opted out,
or failing open) gets a placeholder socket for its org.tpmmux.0 channel, so that libvirt can
label it.`,
		Sections: []cli.Section{
			{Title: "Configuration", Body: `/etc/tpmmux/hook.json (or the file $TPMMUX_HOOK_CONFIG names), every key optional:

  control_socket  the bridge's control socket (default /run/tpmmux/control.sock)
  timeout         bound on the whole hook run, e.g. "2s" (default "2s", at most "1m")
  fail_open       true: start domains even when the bridge does not answer or refuses;
                  they run unattested (default false)
  mode            "opt-out": every domain unless its metadata says enabled="no";
                  "opt-in": only domains whose metadata says enabled="yes" (default "opt-out")
  serial_dir      the bridge's serial_dir, where placeholder sockets may go
                  (default /run/tpmmux/serial)

The domain's choice: <tpmmux:attest xmlns:tpmmux="https://tpmmux.dev/xmlns/domain/1" enabled="no"/>
in its <metadata>. An unreadable or invalid hook.json fails prepare and started closed.`},
			{Title: "Exit status", Body: `0 the step may go on; 1 migrate, prepare or started refused (fail-closed); 2 usage error.`},
			{Title: "See also", Body: `tpmmux-bridge(8); docs/hook.md`},
		},
	}
}

// helpOrVersion answers --help, --version and --man (and nothing else:
// libvirt always passes at least DOMAIN OP SUBOP, so a domain named "help"
// is still a domain).
func helpOrVersion(args []string, stdout, stderr io.Writer) (int, bool) {
	if len(args) != 1 {
		return 0, false
	}
	return command().Dispatch(args, "", stdout, stderr)
}

// op is what the hook does for one libvirt op.
type op struct {
	name     string // control op
	needXML  bool
	critical bool // a failure aborts the libvirt operation (unless fail_open)
	retry    bool // wait (within the timeout) for a bridge that is coming up
}

func opFor(o, sub string) (op, bool) {
	switch o + " " + sub {
	case "migrate begin":
		// The destination of a live migration: the bridge reserves the
		// VM's identity at its source; a failure cancels the migration.
		return op{name: control.OpMigrate, needXML: true, critical: true, retry: true}, true
	case "prepare begin":
		return op{name: control.OpPrepare, needXML: true, critical: true, retry: true}, true
	case "started begin":
		return op{name: control.OpStarted, needXML: true, critical: true, retry: true}, true
	case "stopped end":
		return op{name: control.OpStopped, needXML: true}, true
	case "release end":
		return op{name: control.OpRelease, needXML: true}, true
	case "reconnect begin":
		// libvirt kills a running domain whose reconnect hook fails:
		// never. A bridge that is down re-adopts its live VMs itself when
		// it starts.
		return op{name: control.OpReconnect, needXML: true}, true
	}
	return op{}, false
}

func run(args []string, stdin io.Reader, stderr io.Writer) int {
	if len(args) < 3 {
		command().UsageError(stderr, "DOMAIN OP SUBOP are required (libvirt runs the hook from /etc/libvirt/hooks/qemu.d/)")
		return cli.ExitUsage
	}
	domain, o, sub := args[0], args[1], args[2]
	extra := "-"
	if len(args) > 3 {
		extra = args[3]
	}
	what, ok := opFor(o, sub)
	if !ok {
		return 0
	}
	cfg, cfgErr := loadConfig()
	ctx, cancel := context.WithTimeout(context.Background(), cfg.timeout)
	defer cancel()
	var dom *libvirt.Domain
	// finish leaves a placeholder socket when a domain starts without the
	// bridge's listener, and removes it once the domain is gone
	// (placeholder.go).
	finish := func(code int) int {
		p := placeholderPath(dom, cfg.SerialDir)
		switch {
		case p == "" || code != 0:
		case what.name == control.OpPrepare:
			if _, err := ensurePlaceholder(p); err != nil {
				fmt.Fprintf(stderr, "tpmmux: %s %s: %v\n", o, domain, err)
			}
		case what.name == control.OpRelease:
			if _, err := removePlaceholder(p); err != nil {
				fmt.Fprintf(stderr, "tpmmux: %s %s: %v\n", o, domain, err)
			}
		}
		return code
	}
	fail := func(failOpen bool, format string, a ...any) int {
		fmt.Fprintf(stderr, "tpmmux: "+format+"\n", a...)
		if what.critical && !failOpen {
			return 1
		}
		return finish(0)
	}
	if cfgErr != nil {
		return fail(false, "%v", cfgErr)
	}
	xml, err := readXML(ctx, stdin)
	if err != nil && what.critical {
		return fail(cfg.FailOpen, "%s %s: %v", o, domain, err)
	}
	if err == nil {
		dom, err = libvirt.ParseDomain(xml)
	}
	switch {
	case err != nil && what.critical:
		return fail(cfg.FailOpen, "%s %s: %v", o, domain, err)
	case err != nil && what.name == control.OpReconnect:
		return fail(true, "%s %s: %v", o, domain, err)
	case dom != nil && !attested(cfg.Mode, dom) && what.critical && bridgeTPM(dom, cfg) != "":
		return fail(false, "%s %s: the domain is not attested (%s) but its <tpm> is the bridge's vTPM at %s, without which QEMU cannot start: remove the <tpm> device or the opt-out", o, domain, notAttestedWhy(cfg.Mode), bridgeTPM(dom, cfg))
	case dom != nil && !attested(cfg.Mode, dom):
		// Opted out (or not in): the bridge is not involved.
		return finish(0)
	}
	// A domain whose TPM the bridge serves cannot start without the
	// bridge: failing open would only trade the hook's clear line for
	// QEMU's "Failed to connect" (docs/hook.md).
	failOpen := cfg.FailOpen
	if failOpen && what.critical && bridgeTPM(dom, cfg) != "" {
		failOpen = false
		fail = func(_ bool, format string, a ...any) int {
			fmt.Fprintf(stderr, "tpmmux: "+format+" (fail_open does not apply: the bridge serves this domain's vTPM)\n", a...)
			return 1
		}
	}
	// stopped and release go to the bridge by name even without a
	// readable XML: for a domain it does not know they are no-ops.
	req := &control.Request{Op: what.name, FailOpen: failOpen}
	switch what.name {
	case control.OpPrepare, control.OpReconnect:
		req.XML = string(xml)
	case control.OpStarted, control.OpMigrate:
		req.Name, req.XML = domain, string(xml)
	case control.OpStopped, control.OpRelease:
		req.Name, req.Reason = domain, extra
	}
	c := &control.Client{Path: cfg.ControlSocket, RetryDial: what.retry}
	resp, err := c.Call(ctx, req)
	var re *control.RemoteError
	switch {
	case errors.As(err, &re):
		return fail(failOpen, "%s %s refused by the bridge: %s", o, domain, re.Msg)
	case err != nil:
		var ue *control.UnreachableError
		cause := err
		if errors.As(err, &ue) {
			cause = ue.Err
		}
		if what.critical {
			return fail(failOpen, "bridge not answering on %s within %s (%v); start tpmmux-bridge or set fail_open in %s", cfg.ControlSocket, cfg.timeout, cause, cfg.path)
		}
		return fail(true, "%s %s not delivered: bridge not answering on %s (%v); it catches up when it starts", o, domain, cfg.ControlSocket, cause)
	}
	_ = resp
	return finish(0)
}

// bridgeTPM returns the socket of dom's <tpm> when the bridge serves it
// (an external backend whose socket is in the bridge's runtime directory,
// the parent of serial_dir: /run/tpmmux), else "".
func bridgeTPM(dom *libvirt.Domain, cfg *config) string {
	if dom == nil {
		return ""
	}
	run := filepath.Dir(filepath.Clean(cfg.SerialDir))
	if p := dom.VTPMSocket; p != "" {
		if c := filepath.Clean(p); filepath.IsAbs(p) && strings.HasPrefix(c, run+string(filepath.Separator)) {
			return c
		}
	}
	return ""
}

func notAttestedWhy(mode string) string {
	if mode == "opt-in" {
		return `mode opt-in, no <tpmmux:attest enabled="yes"/>`
	}
	return `<tpmmux:attest enabled="no"/>`
}

// attested says whether a domain takes part under mode (libvirt's rule).
func attested(mode string, dom *libvirt.Domain) bool {
	ok, _ := dom.Attested(mode)
	return ok
}

// readXML reads the domain XML from stdin within ctx, at most
// libvirt.MaxDomainXML bytes.
func readXML(ctx context.Context, r io.Reader) ([]byte, error) {
	b, err := await.Do(ctx, func() ([]byte, error) {
		return io.ReadAll(io.LimitReader(r, libvirt.MaxDomainXML+1))
	})
	switch {
	case err != nil && ctx.Err() != nil && errors.Is(err, ctx.Err()):
		return nil, errors.New("domain XML not received on stdin in time")
	case err != nil:
		return nil, fmt.Errorf("read domain XML from stdin: %w", err)
	case len(b) > libvirt.MaxDomainXML:
		return nil, fmt.Errorf("domain XML on stdin exceeds %d bytes", libvirt.MaxDomainXML)
	case len(bytes.TrimSpace(b)) == 0:
		return nil, errors.New("no domain XML on stdin")
	}
	return b, nil
}
