package libvirt

import (
	"context"
	"fmt"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/tpmmux/tpmmux/internal/await"
	"github.com/tpmmux/tpmmux/internal/record"
)

// EventKind says what happened to a domain.
type EventKind string

// The event kinds: libvirt's lifecycle events (VIR_DOMAIN_EVENT_ID_LIFECYCLE)
// and, as EventReset, its reboot event (VIR_DOMAIN_EVENT_ID_REBOOT).
const (
	EventDefined     EventKind = "defined"
	EventUndefined   EventKind = "undefined"
	EventStarted     EventKind = "started"
	EventSuspended   EventKind = "suspended"
	EventResumed     EventKind = "resumed"
	EventStopped     EventKind = "stopped"
	EventShutdown    EventKind = "shutdown"
	EventPMSuspended EventKind = "pmsuspended"
	EventCrashed     EventKind = "crashed"
	// EventReset is a guest reset: libvirt's reboot event, which QEMU's
	// RESET event triggers whether the guest or the host (virsh reset)
	// asked for it. SeaBIOS resets the machine again after a warm reset,
	// so one `virsh reset` of a BIOS guest gives several within ~100 ms
	// (three with Debian 12's QEMU 7.2: host-qmp-system-reset, then
	// guest-reset twice).
	EventReset EventKind = "reset"
)

// Event is a domain lifecycle event.
type Event struct {
	Name   string
	UUID   [16]byte
	ID     int32 // libvirt's domain id; -1 once stopped
	Kind   EventKind
	Detail string // libvirt's detail for Kind, e.g. "booted", "destroyed", "paused"; "" for EventReset
}

// lifecycleKind names a lifecycle event type and its details, in libvirt's
// numbering (libvirt-domain.h, virDomainEvent*DetailType, libvirt 9.0).
func lifecycleKind(event int32) (EventKind, []string) {
	switch golibvirt.DomainEventType(event) {
	case golibvirt.DomainEventDefined:
		return EventDefined, []string{"added", "updated", "renamed", "from-snapshot"}
	case golibvirt.DomainEventUndefined:
		return EventUndefined, []string{"removed", "renamed"}
	case golibvirt.DomainEventStarted:
		return EventStarted, []string{"booted", "migrated", "restored", "from-snapshot", "wakeup", "recreated"}
	case golibvirt.DomainEventSuspended:
		return EventSuspended, []string{"paused", "migrated", "ioerror", "watchdog", "restored", "from-snapshot", "api-error", "postcopy", "postcopy-failed"}
	case golibvirt.DomainEventResumed:
		return EventResumed, []string{"unpaused", "migrated", "from-snapshot", "postcopy", "postcopy-failed"}
	case golibvirt.DomainEventStopped:
		return EventStopped, []string{"shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot", "recreated"}
	case golibvirt.DomainEventShutdown:
		return EventShutdown, []string{"finished", "guest", "host"}
	case golibvirt.DomainEventPmsuspended:
		return EventPMSuspended, []string{"memory", "disk"}
	case golibvirt.DomainEventCrashed:
		return EventCrashed, []string{"panicked", "crashloaded"}
	}
	return EventKind(fmt.Sprintf("event-%d", event)), nil
}

// lifecycleEvent maps a libvirt lifecycle event.
func lifecycleEvent(m golibvirt.DomainEventLifecycleMsg) Event {
	kind, details := lifecycleKind(m.Event)
	detail := fmt.Sprintf("detail-%d", m.Detail)
	if m.Detail >= 0 && int(m.Detail) < len(details) {
		detail = details[m.Detail]
	}
	return Event{Name: m.Dom.Name, UUID: m.Dom.UUID, ID: m.Dom.ID, Kind: kind, Detail: detail}
}

// rebootEvent maps a libvirt reboot event.
func rebootEvent(m golibvirt.DomainEventRebootMsg) Event {
	return Event{Name: m.Dom.Name, UUID: m.Dom.UUID, ID: m.Dom.ID, Kind: EventReset}
}

// RebootReason is the reason of the reboot record for an EventReset.
const RebootReason = "guest-reset"

// RebootRecord is the record of a guest reset the host saw at now (an
// EventReset). It has no boot id: the guest agent tells its new one when it
// reconnects, and the bridge then resumes it from IMA index 0.
func RebootRecord(now time.Time) *record.Record {
	return &record.Record{Kind: record.KindReboot, Time: now.UnixNano(), Reboot: &record.Reboot{Reason: RebootReason}}
}

// Events streams the lifecycle and reset events of all domains until ctx
// ends or the connection is lost; then the channel is closed. The stream
// starts when Events returns: events before that are not seen.
//
// libvirt delivers lifecycle and reboot events on two callbacks that
// go-libvirt queues separately, so an EventReset and a lifecycle event
// that follow each other within microseconds may arrive swapped; events of
// one callback keep their order.
func (c *Client) Events(ctx context.Context) (<-chan Event, error) {
	sub, cancel := context.WithCancel(ctx)
	life, err := c.subscribe(sub, golibvirt.DomainEventIDLifecycle)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("subscribe to lifecycle events: %w", err)
	}
	reb, err := c.subscribe(sub, golibvirt.DomainEventIDReboot)
	if err != nil {
		cancel()
		drain(life)
		return nil, fmt.Errorf("subscribe to reboot events: %w", err)
	}
	out := make(chan Event)
	go func() {
		defer close(out)
		defer cancel()
		for life != nil || reb != nil {
			var ev Event
			select {
			case v, ok := <-life:
				if !ok {
					life = nil
					cancel() // one stream ended: end the other too
					continue
				}
				m, isLife := v.(*golibvirt.DomainEventCallbackLifecycleMsg)
				if !isLife {
					continue
				}
				ev = lifecycleEvent(m.Msg)
			case v, ok := <-reb:
				if !ok {
					reb = nil
					cancel()
					continue
				}
				m, isReboot := v.(*golibvirt.DomainEventCallbackRebootMsg)
				if !isReboot {
					continue
				}
				ev = rebootEvent(m.Msg)
			}
			select {
			case out <- ev:
			case <-sub.Done(): // keep draining go-libvirt's channels until they close
			}
		}
	}()
	return out, nil
}

// subscribe registers for one event id. go-libvirt's stream goroutine
// blocks on sending to the returned channel, so it must be read until it
// closes (after sub ends).
func (c *Client) subscribe(sub context.Context, id golibvirt.DomainEventID) (<-chan any, error) {
	return await.DoOr(sub, func() (<-chan any, error) {
		return c.l.SubscribeEvents(sub, id, nil)
	}, drain)
}

// drain reads ch until it closes, in the background.
func drain(ch <-chan any) {
	go func() {
		for range ch {
		}
	}()
}
