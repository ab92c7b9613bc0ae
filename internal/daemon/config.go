// Package daemon is the tpmmux bridge daemon (tpmmux-bridge run): it owns
// the TPM, the log store and the multiplexer, serves the control socket the
// libvirt hook and the admin commands use, opens and closes every VM's
// guest listeners (virtio-serial, vsock, a unix socket for development),
// runs the guest protocol on them, and serves Prometheus metrics.
package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/jsonconf"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/libvirt"
)

// Defaults of the daemon's configuration.
const (
	DefaultConfigFile = "/etc/tpmmux/bridge.json"
	DefaultTPM        = "device"
	DefaultStateDir   = "/var/lib/tpmmux"
	DefaultSerialDir  = "/run/tpmmux/serial"
	DefaultVTPMDir    = "/run/tpmmux/vtpm"
	DefaultVTPMBanks  = "sha1,sha256"
	DefaultHostPCRs   = "0-7,10"
	DefaultSerialMode = "0660"
	DefaultStopGrace  = 3 * time.Second
)

// The attestation modes: which domains get an identity.
const (
	ModeOptOut = libvirt.ModeOptOut // every domain, unless its metadata says enabled="no"
	ModeOptIn  = libvirt.ModeOptIn  // only domains whose metadata says enabled="yes"
)

// Config is the daemon's configuration: a JSON file (every key optional;
// docs/hook.md lists them) overridden by command-line flags.
type Config struct {
	// TPM is the TPM backend: "device" (/dev/tpmrm0), "device:PATH",
	// "swtpm:HOST:PORT", "swtpm:unix:PATH" or "sim" (testing only).
	TPM string `json:"tpm"`
	// StateDir holds the log store (log.db) and the per-VM listener state.
	StateDir string `json:"state_dir"`
	// PCR is the PCR the bridge owns (sha256 bank): one of 0-15, which
	// only a host reboot resets (docs/protocol.md "Choosing the PCR").
	PCR int `json:"pcr"`
	// InsecureResettablePCR allows a PCR that can be reset without a
	// reboot (16, 23). For tests of that attack only.
	InsecureResettablePCR bool `json:"insecure_resettable_pcr"`
	// HostPCRs are the host PCRs every quote covers, e.g. "0-7,10"; "none"
	// for none.
	HostPCRs string `json:"host_pcrs"`
	// ControlSocket is the control socket (mode 0600, root only).
	ControlSocket string `json:"control_socket"`
	// VTPMDir is where per-VM vTPM sockets may be: a domain whose
	// external TPM backend's socket is directly in it gets a vTPM served by
	// the bridge (docs/vtpm.md). Its mode and group are the serial ones.
	VTPMDir string `json:"vtpm_dir"`
	// VTPMBanks are the PCR banks each vTPM offers, e.g. "sha1,sha256".
	VTPMBanks string `json:"vtpm_banks"`
	// VTPMMode is when a guest's TPM command returns: "durable" (its
	// record is in the log store) or "anchored" (also extended into the
	// host TPM).
	VTPMMode string `json:"vtpm_mode"`
	// SerialDir is where per-VM virtio-serial sockets may be: a domain's
	// org.tpmmux.0 channel path must be directly in it.
	SerialDir string `json:"serial_dir"`
	// SerialGroup is the group (name or number) given to the serial
	// sockets so that QEMU can connect; "" leaves root's.
	SerialGroup string `json:"serial_group"`
	// SerialMode is the serial sockets' mode, octal.
	SerialMode string `json:"serial_mode"`
	// GuestUnixDir, if set, gives every VM a plain unix socket
	// DIR/<name>.sock (development transport).
	GuestUnixDir string `json:"guest_unix_dir"`
	// Vsock is "auto" (on when the host has vhost-vsock), "on" or "off".
	Vsock string `json:"vsock"`
	// Metrics is the loopback address of the Prometheus endpoint
	// (/metrics), e.g. "127.0.0.1:9464"; "" for none.
	Metrics string `json:"metrics"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"log_level"`
	// LogFormat is text (logfmt-like lines, for the journal) or json (one
	// object per line, for log shippers).
	LogFormat string `json:"log_format"`
	// Hook is the bridge's side of the hook policy.
	Hook HookPolicy `json:"hook"`
	// Host is the host name written into epoch and genesis records
	// (default: the system's host name).
	Host string `json:"host"`
	// Libvirt is where to reach libvirtd for reconciliation (a socket path
	// or a libvirt URI); "" turns it off.
	Libvirt string `json:"libvirt"`
	// ControlTimeout bounds one control request.
	ControlTimeout Duration `json:"control_timeout"`
	// StopGrace is how long a teardown waits after "stopped end" for
	// "release end", which carries libvirt's shutoff reason.
	StopGrace Duration `json:"stop_grace"`
	// KeyRetention is how long an ended VM's key and records are kept
	// (then destroyed: its evidence can no longer be produced); 0 keeps
	// them forever.
	KeyRetention Duration `json:"key_retention"`
	// Enforce lists what the bridge does when a verifier it trusts reports
	// a violation (control op "violation"), in order: "log", "webhook",
	// "pause" (enforce.go). Each action is recorded in the VM's log.
	// Unset means ["log"]; [] means no action.
	Enforce []string `json:"enforce"`
	// EnforceWebhook is the http(s) URL the webhook action POSTs to.
	EnforceWebhook string `json:"enforce_webhook"`
	// EnforceWebhookTimeout bounds one webhook POST (unset: 5s).
	EnforceWebhookTimeout Duration `json:"enforce_webhook_timeout"`
	// EnforceQMPDir, if set, is where the pause action finds the QMP
	// socket of a VM that QEMU runs without libvirt: DIR/<name>.sock.
	EnforceQMPDir string `json:"enforce_qmp_dir"`
	// Quota bounds each VM instance's records (quota.go in
	// internal/bridge): unset keys take the defaults, -1 is unlimited.
	Quota QuotaConfig `json:"quota"`
	// Conceal is activity concealment with cover leaves (mux.Cover), on
	// by default: unset keys take the defaults, pad -1 turns it off.
	Conceal ConcealConfig `json:"conceal"`
	// Migration is live migration between bridges (docs/migration.md):
	// this bridge's peer listener and certificate, the EK CA, and the
	// peers it hands VMs to and takes them from. Unset: attested VMs do
	// not migrate to this host.
	Migration migrate.Config `json:"migration"`
}

// HookPolicy is the bridge's side of the hook policy (the hook has its
// own, in /etc/tpmmux/hook.json, for when the bridge cannot answer).
type HookPolicy struct {
	// Mode is opt-out (default: every domain is attested unless its
	// metadata opts out) or opt-in.
	Mode string `json:"mode"`
	// FailOpen makes a prepare that fails inside the bridge answer
	// "skipped" instead of an error, so the domain starts unattested.
	FailOpen bool `json:"fail_open"`
	// RequireTransport refuses a domain that no guest transport would
	// reach (no org.tpmmux.0 channel, and no <vsock> on a host that serves
	// vsock) instead of giving it an identity with a warning.
	RequireTransport bool `json:"require_transport"`
}

// Duration is a time.Duration written as a Go duration string ("2s").
type Duration time.Duration

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON reads a duration string such as "2s" or "500ms".
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%s is not a duration: want a string such as \"2s\", \"500ms\" or \"1m30s\"", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration: want a string such as \"2s\", \"500ms\" or \"1m30s\"", s)
	}
	*d = Duration(v)
	return nil
}

// DefaultConfig returns the configuration with every default filled in.
func DefaultConfig() Config {
	return Config{
		TPM:            DefaultTPM,
		StateDir:       DefaultStateDir,
		PCR:            mux.DefaultPCR,
		HostPCRs:       DefaultHostPCRs,
		ControlSocket:  control.DefaultSocket,
		SerialDir:      DefaultSerialDir,
		VTPMDir:        DefaultVTPMDir,
		VTPMBanks:      DefaultVTPMBanks,
		VTPMMode:       "durable",
		SerialMode:     DefaultSerialMode,
		Vsock:          "auto",
		LogLevel:       "info",
		LogFormat:      "text",
		Hook:           HookPolicy{Mode: ModeOptOut},
		ControlTimeout: Duration(control.DefaultTimeout),
		StopGrace:      Duration(DefaultStopGrace),
	}
}

// LoadConfig reads a JSON configuration file over the defaults. Unknown
// keys are an error (a misspelt key would otherwise be silently ignored).
// A missing file is an error unless optional is set.
func LoadConfig(path string, optional bool) (Config, error) {
	cfg := DefaultConfig()
	b, err := os.ReadFile(path)
	if err != nil {
		if optional && errors.Is(err, os.ErrNotExist) {
			return cfg, nil
		}
		return cfg, fmt.Errorf("config: %w", err)
	}
	if err := jsonconf.Decode(path, b, &cfg); err != nil {
		return cfg, fmt.Errorf("config %w", err)
	}
	return cfg, nil
}

// settings are the validated, parsed forms of a Config.
type settings struct {
	hostPCRs   []int
	serialMode os.FileMode
	serialGID  int // -1: leave
	vtpmBanks  []vpcr.Alg
	metrics    string
	cover      mux.Cover
}

// Validate checks the configuration and says what is wrong with it.
func (c *Config) Validate() error {
	_, err := c.parse()
	return err
}

func (c *Config) parse() (*settings, error) {
	s := &settings{serialGID: -1}
	if c.TPM == "" {
		return nil, errors.New("config: tpm is empty")
	}
	if c.PCR < 1 || c.PCR > 23 {
		return nil, fmt.Errorf("config: pcr %d out of range 1-23", c.PCR)
	}
	var err error
	if s.hostPCRs, err = ParsePCRList(c.HostPCRs); err != nil {
		return nil, fmt.Errorf("config: host_pcrs: %w", err)
	}
	if slices.Contains(s.hostPCRs, c.PCR) {
		return nil, fmt.Errorf("config: host_pcrs %q contains the bridge's own pcr %d", c.HostPCRs, c.PCR)
	}
	for _, b := range strings.Split(c.VTPMBanks, ",") {
		a, err := vpcr.ParseAlg(strings.TrimSpace(b))
		if err != nil {
			return nil, fmt.Errorf("config: vtpm_banks: %w", err)
		}
		s.vtpmBanks = append(s.vtpmBanks, a)
	}
	if s.vtpmBanks, err = vpcr.CheckBanks(s.vtpmBanks); err != nil {
		return nil, fmt.Errorf("config: vtpm_banks: %w", err)
	}
	if c.Migration.Enabled() {
		if err := c.Migration.Validate(); err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
	}
	switch c.VTPMMode {
	case "durable", "anchored":
	default:
		return nil, fmt.Errorf("config: vtpm_mode %q, want durable or anchored", c.VTPMMode)
	}
	for name, p := range map[string]string{"state_dir": c.StateDir, "control_socket": c.ControlSocket, "serial_dir": c.SerialDir, "vtpm_dir": c.VTPMDir} {
		if p == "" || !filepath.IsAbs(p) {
			return nil, fmt.Errorf("config: %s %q must be an absolute path", name, p)
		}
	}
	if c.GuestUnixDir != "" && !filepath.IsAbs(c.GuestUnixDir) {
		return nil, fmt.Errorf("config: guest_unix_dir %q must be an absolute path", c.GuestUnixDir)
	}
	m, err := strconv.ParseUint(c.SerialMode, 8, 32)
	if err != nil || m > 0o777 {
		return nil, fmt.Errorf("config: serial_mode %q is not an octal file mode such as 0660", c.SerialMode)
	}
	s.serialMode = os.FileMode(m)
	if c.SerialGroup != "" {
		if s.serialGID, err = lookupGroup(c.SerialGroup); err != nil {
			return nil, fmt.Errorf("config: serial_group: %w", err)
		}
	}
	switch c.Vsock {
	case "auto", "on", "off":
	default:
		return nil, fmt.Errorf("config: vsock %q, want auto, on or off", c.Vsock)
	}
	if c.Metrics != "" {
		if s.metrics, err = LoopbackAddr(c.Metrics); err != nil {
			return nil, fmt.Errorf("config: metrics: %w", err)
		}
	}
	if _, err := ParseLevel(c.LogLevel); err != nil {
		return nil, fmt.Errorf("config: log_level: %w", err)
	}
	switch c.LogFormat {
	case "", "text", "json":
	default:
		return nil, fmt.Errorf("config: log_format %q, want text or json", c.LogFormat)
	}
	switch c.Hook.Mode {
	case ModeOptOut, ModeOptIn:
	default:
		return nil, fmt.Errorf("config: hook.mode %q, want %s or %s", c.Hook.Mode, ModeOptOut, ModeOptIn)
	}
	if c.ControlTimeout <= 0 {
		return nil, fmt.Errorf("config: control_timeout must be positive")
	}
	if c.StopGrace < 0 {
		return nil, fmt.Errorf("config: stop_grace must not be negative")
	}
	if c.KeyRetention < 0 {
		return nil, fmt.Errorf("config: key_retention must not be negative")
	}
	if err := c.parseEnforce(); err != nil {
		return nil, err
	}
	if _, err := c.Quota.Bridge(); err != nil {
		return nil, err
	}
	if s.cover, err = c.Conceal.Cover(); err != nil {
		return nil, err
	}
	return s, nil
}

// ParsePCRList parses a PCR list such as "0-7,10" ("none" or "" is the
// empty list).
func ParsePCRList(s string) ([]int, error) {
	out := []int{}
	s = strings.TrimSpace(s)
	if s == "" || s == "none" {
		return out, nil
	}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(strings.TrimSpace(lo))
		if err != nil {
			return nil, fmt.Errorf("%q is not a PCR list such as 0-7,10", s)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(strings.TrimSpace(hi)); err != nil || b < a {
				return nil, fmt.Errorf("%q is not a PCR list such as 0-7,10", s)
			}
		}
		if a < 0 || b > 23 {
			return nil, fmt.Errorf("PCR %s out of range 0-23", part)
		}
		for p := a; p <= b; p++ {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// LoopbackAddr checks that addr (HOST:PORT) is on a loopback interface
// and returns it with "localhost" resolved to 127.0.0.1. The metrics
// endpoint has no authentication, so it never listens beyond the host.
func LoopbackAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%q is not HOST:PORT: %w", addr, err)
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return "", fmt.Errorf("%q is not a loopback address: the metrics endpoint has no authentication, so it listens only on 127.0.0.1 or [::1] (put a proxy in front to reach it remotely)", addr)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return "", fmt.Errorf("%q: bad port", addr)
	}
	return net.JoinHostPort(host, port), nil
}

func lookupGroup(g string) (int, error) {
	if n, err := strconv.Atoi(g); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("gid %d", n)
		}
		return n, nil
	}
	grp, err := user.LookupGroup(g)
	if err != nil {
		return 0, fmt.Errorf("group %q: %w", g, err)
	}
	return strconv.Atoi(grp.Gid)
}

// NewConfiguredLogger returns the daemon's logger as cfg says: its level,
// and text or JSON lines on w.
func NewConfiguredLogger(w io.Writer, cfg Config) (*slog.Logger, error) {
	l, err := ParseLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	o := &slog.HandlerOptions{Level: l}
	switch cfg.LogFormat {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, o)), nil
	}
	return nil, fmt.Errorf("log format %q, want text or json", cfg.LogFormat)
}

// QuotaConfig is the "quota" block: per-VM limits on what a guest may put
// into the shared log (docs/hook.md lists the keys, internal/bridge the
// defaults and why). 0 or unset takes the default; -1 is unlimited.
type QuotaConfig struct {
	RecordsPerSecond float64 `json:"records_per_second"`
	RecordBurst      float64 `json:"record_burst"`
	BytesPerSecond   float64 `json:"bytes_per_second"`
	ByteBurst        float64 `json:"byte_burst"`
	MaxEntryBytes    int     `json:"max_entry_bytes"`
	MaxRecords       int64   `json:"max_records"`
}

// Bridge checks the block and returns the bridge's quota.
func (q QuotaConfig) Bridge() (bridge.Quota, error) {
	for name, v := range map[string]float64{"records_per_second": q.RecordsPerSecond, "record_burst": q.RecordBurst,
		"bytes_per_second": q.BytesPerSecond, "byte_burst": q.ByteBurst, "max_entry_bytes": float64(q.MaxEntryBytes), "max_records": float64(q.MaxRecords)} {
		if v < 0 && v != -1 {
			return bridge.Quota{}, fmt.Errorf("config: quota.%s is %g: want a positive number, 0 for the default or -1 for unlimited", name, v)
		}
	}
	if q.MaxEntryBytes > ima.MaxTemplateDataLen {
		return bridge.Quota{}, fmt.Errorf("config: quota.max_entry_bytes %d is above the protocol's limit of %d", q.MaxEntryBytes, ima.MaxTemplateDataLen)
	}
	return bridge.Quota{RecordsPerSecond: q.RecordsPerSecond, RecordBurst: q.RecordBurst, BytesPerSecond: q.BytesPerSecond,
		ByteBurst: q.ByteBurst, MaxEntryBytes: q.MaxEntryBytes, MaxRecords: q.MaxRecords}, nil
}

// ConcealConfig is the "conceal" block: cover leaves make what one VM's
// verifier sees of the log independent of the other VMs' activity within an
// envelope of Pad records per Interval (docs/security.md), at the cost of
// Pad/Interval cover entries and 1/Interval extends while any VM is live,
// and up to Interval of added ack latency (docs/performance.md).
type ConcealConfig struct {
	// Pad pads every batch to a multiple of this many leaves; 0 is
	// DefaultConcealPad, -1 turns concealment off.
	Pad int `json:"pad"`
	// Interval is the slot: one batch per Interval while any VM is live;
	// 0 is DefaultConcealInterval.
	Interval Duration `json:"interval"`
	// Flush is the queue length that commits at once (0: 4 × pad).
	Flush int `json:"flush"`
}

// Defaults of ConcealConfig.
const (
	DefaultConcealPad      = 16
	DefaultConcealInterval = time.Second
)

// Cover checks the block and returns the multiplexer's setting.
func (c ConcealConfig) Cover() (mux.Cover, error) {
	if c.Pad == -1 {
		return mux.Cover{}, nil
	}
	if c.Pad < 0 || c.Flush < 0 || c.Interval < 0 {
		return mux.Cover{}, fmt.Errorf("config: conceal: pad %d, flush %d, interval %v: want positive values (pad -1 turns concealment off)", c.Pad, c.Flush, time.Duration(c.Interval))
	}
	cv := mux.Cover{Pad: c.Pad, Interval: time.Duration(c.Interval), Flush: c.Flush}
	if cv.Pad == 0 {
		cv.Pad = DefaultConcealPad
	}
	if cv.Interval == 0 {
		cv.Interval = DefaultConcealInterval
	}
	if cv.Interval < time.Millisecond {
		return mux.Cover{}, fmt.Errorf("config: conceal.interval %v is below 1ms: every slot is a TPM extend", cv.Interval)
	}
	return cv, nil
}
