package libvirt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// Watcher keeps a connection to libvirtd and follows its domain events,
// reconnecting (with exponential backoff) whenever libvirtd stops or
// restarts. Events that happen while it is disconnected are not seen;
// Connected runs after every (re)connection so the caller can catch up
// (the bridge reconciles there).
type Watcher struct {
	// Target is the libvirtd socket path or URI (see Connect).
	Target string
	// Log receives connection state changes; nil means slog.Default().
	Log *slog.Logger
	// MinBackoff and MaxBackoff bound the wait between connection attempts
	// (defaults 500 ms and 30 s).
	MinBackoff, MaxBackoff time.Duration
	// Connected, if set, runs after each connection, once the event
	// subscription is in place (events that happen during it are queued,
	// not lost). An error drops the connection and retries after backoff.
	Connected func(ctx context.Context, c *Client) error
	// Event, if set, is called for every event, one at a time, in order.
	Event func(ctx context.Context, c *Client, ev Event)

	mu  sync.Mutex
	cur *Client
}

// Client is the current connection, or nil while disconnected. It may be
// closed at any time by a reconnection: use it for one short task.
func (w *Watcher) Client() *Client {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cur
}

func (w *Watcher) setClient(c *Client) {
	w.mu.Lock()
	w.cur = c
	w.mu.Unlock()
}

func (w *Watcher) log() *slog.Logger {
	if w.Log != nil {
		return w.Log
	}
	return slog.Default()
}

// Run connects and follows events until ctx ends, and then returns
// ctx.Err().
func (w *Watcher) Run(ctx context.Context) error {
	minB, maxB := w.MinBackoff, w.MaxBackoff
	if minB <= 0 {
		minB = 500 * time.Millisecond
	}
	if maxB < minB {
		maxB = max(30*time.Second, minB)
	}
	backoff := minB
	// Only changes of state are warnings: the first failure at start, and
	// the loss of a connection that was following events. The retries in
	// between are debug lines; the next success is an info line.
	failing := false
	for {
		up, err := w.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if up {
			backoff = minB
			failing = false
		}
		if !failing {
			w.log().Warn("libvirt: not following events; retrying quietly until libvirtd answers", "target", w.Target, "err", err, "retry_in", backoff)
			failing = true
		} else {
			w.log().Debug("libvirt: still not following events", "target", w.Target, "err", err, "retry_in", backoff)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, maxB)
	}
}

// session runs one connection; up says whether it got as far as
// following events.
func (w *Watcher) session(ctx context.Context) (up bool, err error) {
	c, err := Connect(ctx, w.Target)
	if err != nil {
		return false, err
	}
	defer c.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	evs, err := c.Events(sctx)
	if err != nil {
		return false, err
	}
	w.setClient(c)
	defer w.setClient(nil)
	if w.Connected != nil {
		if err := w.Connected(sctx, c); err != nil {
			return false, fmt.Errorf("after connecting: %w", err)
		}
	}
	w.log().Info("libvirt: following domain events", "target", w.Target)
	for ev := range evs {
		if w.Event != nil {
			w.Event(sctx, c, ev)
		}
	}
	if ctx.Err() != nil {
		return true, ctx.Err()
	}
	return true, errors.New("event stream ended: connection to libvirtd lost")
}

// Host is what Follow needs from the bridge daemon.
type Host interface {
	// LiveVMs lists the VM instances whose identity is live.
	LiveVMs() ([]KnownVM, error)
	// Teardown ends VM instance vm.ID (see TeardownFunc).
	Teardown(ctx context.Context, vm KnownVM, reason string) error
	// Reset records that the host saw vm's guest reset (append
	// RebootRecord to vm.ID; an instance that has ended is done).
	Reset(ctx context.Context, vm KnownVM) error
}

// StartHost is a Host that also wants to hear of starts. The bridge
// checks the running QEMU here (qemu.NewLibvirtMonitor on c.Libvirt(), then
// qemu.CheckCID): not in its started-hook handler, because libvirtd holds
// the domain's job while the hook runs, so a monitor command sent before
// the hook returns waits for the hook, which waits for the bridge.
type StartHost interface {
	Host
	// Started is called for libvirt's started event of a domain that has
	// a live identity (after the hook returned), on the event goroutine:
	// keep it short or hand the work off.
	Started(ctx context.Context, vm KnownVM, c *Client)
}

// StopHost is a Host that also wants libvirt's stop events with their
// detail (shutdown, destroyed, crashed, …): libvirt's hooks do not say why a
// domain stopped, its lifecycle event does.
type StopHost interface {
	Host
	// Stopped is called for libvirt's stopped event of a domain, on the
	// event goroutine: keep it short. The identity may already have ended.
	Stopped(ctx context.Context, name string, uuid [16]byte, detail string)
}

// ResumeHost is a Host that also wants libvirt's resumed events: on the
// source of a live migration, a domain that resumes was not migrated (the
// migration failed or was aborted: virsh domjobabort), so the bridge drops
// the handover it had reserved for the destination.
type ResumeHost interface {
	Host
	// Resumed is called for libvirt's resumed event of a domain, on the
	// event goroutine: keep it short.
	Resumed(ctx context.Context, name string, uuid [16]byte, detail string)
}

// ResetCoalesce is the window in which Follow records further resets of
// one VM instance only once: the firmware's own resets after a reset
// (see EventReset) are one reboot to a verifier. No guest boots far enough
// to send measurements within it.
const ResetCoalesce = 500 * time.Millisecond

// Follow returns a Watcher on target that keeps the bridge in step with
// libvirtd: on every (re)connection it reconciles (Client.Plan, then
// Plan.Apply: unknown running domains are reported, identities whose
// domain is gone are torn down with ReasonMissedStop), and for every guest
// reset it calls h.Reset for the live identity of that domain (matched by
// name and UUID; resets within ResetCoalesce of the last recorded one of
// that instance are only logged). Stops stay with the hook
// (stopped/release), which carries the reason. When h is a StartHost, its
// Started is called for every started event of a live identity. Run the
// Watcher with Watcher.Run.
func Follow(target string, h Host, log *slog.Logger) *Watcher {
	if log == nil {
		log = slog.Default()
	}
	w := &Watcher{Target: target, Log: log}
	lastReset := map[conceal.Digest]time.Time{} // used by the event goroutine only
	w.Connected = func(ctx context.Context, c *Client) error {
		plan, err := c.Plan(ctx, h.LiveVMs)
		if err != nil {
			return err
		}
		log.Info("libvirt: reconciled", "matched", len(plan.Matched), "unknown", len(plan.Unknown), "missed_stops", len(plan.Teardown))
		return plan.Apply(ctx, h.Teardown, log)
	}
	w.Event = func(ctx context.Context, c *Client, ev Event) {
		log.Debug("libvirt: domain event", "vm", ev.Name, "kind", ev.Kind, "detail", ev.Detail)
		if st, ok := h.(StopHost); ok && ev.Kind == EventStopped {
			st.Stopped(ctx, ev.Name, ev.UUID, ev.Detail)
			return
		}
		if rh, ok := h.(ResumeHost); ok && ev.Kind == EventResumed {
			rh.Resumed(ctx, ev.Name, ev.UUID, ev.Detail)
			return
		}
		sh, wantStarts := h.(StartHost)
		if ev.Kind != EventReset && (ev.Kind != EventStarted || !wantStarts) {
			return
		}
		vm, ok, err := findLive(h, ev.Name, ev.UUID)
		switch {
		case err != nil:
			log.Error("libvirt: domain event not handled", "vm", ev.Name, "kind", ev.Kind, "err", err)
			return
		case !ok:
			log.Info("libvirt: domain event for a domain without a live identity", "vm", ev.Name, "kind", ev.Kind, "uuid", conceal.FormatUUID(ev.UUID))
			return
		case ev.Kind == EventStarted:
			sh.Started(ctx, vm, c)
			return
		}
		now := time.Now()
		for id, t := range lastReset {
			if now.Sub(t) >= ResetCoalesce {
				delete(lastReset, id)
			}
		}
		if _, recent := lastReset[vm.ID]; recent {
			log.Debug("libvirt: further reset within the coalescing window not recorded", "vm", ev.Name)
			return
		}
		if err := h.Reset(ctx, vm); err != nil {
			log.Error("libvirt: guest reset not recorded", "vm", ev.Name, "err", err)
			return
		}
		lastReset[vm.ID] = now
		log.Info("vm reset recorded", "vm", ev.Name)
	}
	return w
}

func findLive(h Host, name string, uuid [16]byte) (KnownVM, bool, error) {
	vms, err := h.LiveVMs()
	if err != nil {
		return KnownVM{}, false, fmt.Errorf("live identities: %w", err)
	}
	for _, vm := range vms {
		if vm.Name == name && vm.UUID == uuid {
			return vm, true, nil
		}
	}
	return KnownVM{}, false, nil
}
