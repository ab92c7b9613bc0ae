package daemon

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/libvirt"
	"github.com/tpmmux/tpmmux/qemu"
)

// Enforcement: a verifier the bridge trusts (one that can reach the
// root-only control socket: a local one, or a remote one through an admin
// running `tpmmux-bridge violation`) reports a violation on a VM, and the
// bridge carries out the configured actions in order. Every action, done or
// failed, is recorded as an action record in the VM's own log, so the VM's
// verified history shows what was done about it and when.

// The enforcement actions (configuration key "enforce").
const (
	// EnforceLog logs the violation and records it (action "log").
	EnforceLog = "log"
	// EnforceWebhook POSTs the violation as JSON to enforce_webhook
	// (action "webhook", or "webhook-failed").
	EnforceWebhook = "webhook"
	// EnforcePause stops the VM's vCPUs over QMP, through libvirt or a
	// plain QMP socket (action "pause", or "pause-failed").
	EnforcePause = "pause"
)

// DefaultWebhookTimeout bounds a webhook POST unless configured.
const DefaultWebhookTimeout = 5 * time.Second

// maxWebhookTimeout bounds the configurable webhook timeout: the admin
// command waits for every action.
const maxWebhookTimeout = time.Minute

// maxActionDetail bounds the detail of an action record.
const maxActionDetail = 2048

// enforceActions returns the configured actions (unset: just log).
func (c *Config) enforceActions() []string {
	if c.Enforce == nil {
		return []string{EnforceLog}
	}
	return c.Enforce
}

func (c *Config) webhookTimeout() time.Duration {
	if c.EnforceWebhookTimeout <= 0 {
		return DefaultWebhookTimeout
	}
	return time.Duration(c.EnforceWebhookTimeout)
}

// parseEnforce checks the enforcement keys.
func (c *Config) parseEnforce() error {
	seen := map[string]bool{}
	for _, a := range c.enforceActions() {
		switch a {
		case EnforceLog, EnforceWebhook, EnforcePause:
		default:
			return fmt.Errorf("config: enforce: unknown action %q (want %s, %s or %s)", a, EnforceLog, EnforceWebhook, EnforcePause)
		}
		if seen[a] {
			return fmt.Errorf("config: enforce: %q listed twice", a)
		}
		seen[a] = true
	}
	if seen[EnforceWebhook] {
		u, err := url.Parse(c.EnforceWebhook)
		if c.EnforceWebhook == "" || err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("config: enforce lists webhook, so enforce_webhook must be an http(s) URL (is %q)", c.EnforceWebhook)
		}
	}
	if c.EnforceWebhookTimeout < 0 || time.Duration(c.EnforceWebhookTimeout) > maxWebhookTimeout {
		return fmt.Errorf("config: enforce_webhook_timeout must be between 0 and %v", maxWebhookTimeout)
	}
	if c.EnforceQMPDir != "" && !filepath.IsAbs(c.EnforceQMPDir) {
		return fmt.Errorf("config: enforce_qmp_dir %q must be an absolute path", c.EnforceQMPDir)
	}
	if seen[EnforcePause] && c.EnforceQMPDir == "" && c.Libvirt == "" {
		return errors.New("config: enforce lists pause, but the bridge cannot reach QEMU: set libvirt (VMs libvirt runs) or enforce_qmp_dir (plain QMP sockets)")
	}
	return nil
}

var _ control.ViolationHandler = controlHandler{}

// Violation carries out the configured actions for a violation a trusted
// verifier reported on the live VM vm (a name or an instance id) and
// records each in the VM's log.
func (d controlHandler) Violation(ctx context.Context, vm, reason, detail string) (_ *control.Enforcement, err error) {
	defer d.count(control.OpViolation, &err)
	reason, detail = printable(reason), printable(detail)
	id, live, err := d.resolve(vm)
	if err != nil {
		return nil, fmt.Errorf("violation: %w", err)
	}
	if !live {
		return nil, fmt.Errorf("violation: vm %s has ended: nothing to enforce, and its log is closed", vm)
	}
	ident, err := d.mux.Identity(id)
	if err != nil {
		return nil, fmt.Errorf("violation: %w", err)
	}
	name := vm
	for _, v := range d.mustVMs() {
		if v.ID == id {
			name = v.Name
		}
	}
	out := &control.Enforcement{VM: name, Instance: hex.EncodeToString(ident.Instance[:]), Reason: reason}
	what := reason
	if detail != "" {
		what += ": " + detail
	}
	d.log.Warn("violation reported by a verifier", "vm", name, "reason", reason, "detail", detail, "actions", strings.Join(d.cfg.enforceActions(), ","))
	for _, a := range d.cfg.enforceActions() {
		start := time.Now()
		res := control.ActionResult{Action: a}
		var rec *record.Record
		switch a {
		case EnforceLog:
			res.OK, res.Detail = true, "violation: "+what
			rec = actionRecord(time.Now(), EnforceLog, res.Detail)
		case EnforceWebhook:
			status, werr := d.postWebhook(ctx, name, ident, id, reason, detail)
			if werr != nil {
				res.Detail = werr.Error()
				rec = actionRecord(time.Now(), EnforceWebhook+"-failed", res.Detail)
			} else {
				res.OK, res.Detail = true, fmt.Sprintf("POST %s: %s (violation: %s)", redactURL(d.cfg.EnforceWebhook), status, what)
				rec = actionRecord(time.Now(), EnforceWebhook, res.Detail)
			}
		case EnforcePause:
			if perr := d.pauseVM(ctx, name, ident.UUID); perr != nil {
				res.Detail = perr.Error()
				rec = actionRecord(time.Now(), EnforcePause+"-failed", res.Detail)
			} else {
				// qemu.PauseRecord: appended only after the pause took
				// place, so the log never claims one that did not.
				res.OK, res.Detail = true, "vCPUs stopped (violation: "+what+")"
				rec = qemu.PauseRecord(time.Now(), truncate(res.Detail, maxActionDetail))
			}
		}
		// Record on the bridge's own clock: a client that stopped waiting
		// must not keep an action that took place out of the log.
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lifecycleTimeout)
		ack, aerr := d.mux.Append(actx, id, rec)
		cancel()
		if aerr != nil {
			res.OK = false
			res.Detail += fmt.Sprintf(" (not recorded: %v)", aerr)
			d.log.Error("enforcement action not recorded", "vm", name, "action", a, "err", aerr)
		} else {
			seq := ack.Seq
			res.Seq = &seq
		}
		res.Elapsed = control.Duration(time.Since(start))
		level := slog.LevelInfo
		if !res.OK {
			level = slog.LevelError
		}
		d.log.Log(ctx, level, "enforcement action", "vm", name, "action", a, "ok", res.OK, "detail", res.Detail)
		out.Actions = append(out.Actions, res)
		if errors.Is(aerr, mux.ErrEnded) {
			break
		}
	}
	return out, nil
}

func (d *Daemon) mustVMs() []mux.VMInfo {
	v, _ := d.mux.VMs()
	return v
}

func actionRecord(now time.Time, action, detail string) *record.Record {
	return &record.Record{Kind: record.KindAction, Time: now.UnixNano(), Action: &record.Action{Action: action, Detail: truncate(detail, maxActionDetail)}}
}

// webhookEvent is the JSON body of a webhook POST.
type webhookEvent struct {
	Event    string    `json:"event"` // "tpmmux.violation"
	Host     string    `json:"host"`
	VM       string    `json:"vm"`
	UUID     string    `json:"uuid"`
	Instance string    `json:"instance"`
	ID       string    `json:"id"`
	Reason   string    `json:"reason"`
	Detail   string    `json:"detail,omitempty"`
	Time     time.Time `json:"time"`
}

// postWebhook POSTs the violation to the configured URL within the
// configured timeout; a 2xx answer is success. Redirects are not followed.
func (d *Daemon) postWebhook(ctx context.Context, name string, ident *conceal.Identity, id conceal.Digest, reason, detail string) (string, error) {
	body, err := json.Marshal(webhookEvent{Event: "tpmmux.violation", Host: d.host, VM: name, UUID: conceal.FormatUUID(ident.UUID),
		Instance: hex.EncodeToString(ident.Instance[:]), ID: hex.EncodeToString(id[:]), Reason: reason, Detail: detail, Time: time.Now().UTC()})
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, d.cfg.webhookTimeout())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.cfg.EnforceWebhook, bytes.NewReader(body))
	if err != nil {
		return "", fmt.Errorf("webhook: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "tpmmux-bridge/"+d.opts.Version)
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return "", fmt.Errorf("webhook POST %s: %v", redactURL(d.cfg.EnforceWebhook), err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return "", fmt.Errorf("webhook POST %s: %s", redactURL(d.cfg.EnforceWebhook), resp.Status)
	}
	return resp.Status, nil
}

// redactURL drops credentials and the query from a URL before it is
// logged or written into a VM's log.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(webhook)"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

// pauseVM stops the VM's vCPUs (qemu.Pause) through its plain QMP socket
// in enforce_qmp_dir when there is one, else through libvirt.
func (d *Daemon) pauseVM(ctx context.Context, name string, uuid [16]byte) error {
	if d.cfg.EnforceQMPDir != "" {
		if filepath.Base(name) != name || name == "." || name == ".." {
			return fmt.Errorf("pause: vm name %q cannot name a socket", name)
		}
		path := filepath.Join(d.cfg.EnforceQMPDir, name+".sock")
		if _, err := os.Stat(path); err == nil {
			mon, err := qemu.DialSocket(ctx, path)
			if err != nil {
				return fmt.Errorf("pause: %w", err)
			}
			defer mon.Close()
			return qemu.Pause(ctx, mon)
		} else if d.cfg.Libvirt == "" {
			return fmt.Errorf("pause: no QMP socket %s: %w", path, err)
		}
	}
	if d.cfg.Libvirt == "" {
		return errors.New("pause: the bridge cannot reach QEMU (set libvirt or enforce_qmp_dir)")
	}
	c, err := libvirt.Connect(ctx, d.cfg.Libvirt)
	if err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	defer c.Close()
	mon, err := qemu.NewLibvirtMonitor(ctx, c.Libvirt(), uuid)
	if err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	defer mon.Close()
	return qemu.Pause(ctx, mon)
}

// printable replaces control characters (a verifier's text goes into logs
// and records) and trims spaces.
func printable(s string) string {
	return strings.TrimSpace(strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
