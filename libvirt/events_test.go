package libvirt

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/tpmmux/tpmmux/internal/record"
)

func TestLifecycleEvent(t *testing.T) {
	d := golibvirt.Domain{Name: "vm-a", UUID: golibvirt.UUID(uuidN(1)), ID: 7}
	tests := []struct {
		event, detail int32
		kind          EventKind
		want          string
	}{
		{0, 0, EventDefined, "added"},
		{1, 0, EventUndefined, "removed"},
		{2, 0, EventStarted, "booted"},
		{2, 5, EventStarted, "recreated"},
		{3, 0, EventSuspended, "paused"}, // QMP "stop" through libvirt, virsh suspend
		{3, 2, EventSuspended, "ioerror"},
		{4, 0, EventResumed, "unpaused"},
		{5, 0, EventStopped, "shutdown"},
		{5, 1, EventStopped, "destroyed"}, // virsh destroy
		{5, 5, EventStopped, "failed"},
		{6, 2, EventShutdown, "host"},
		{7, 1, EventPMSuspended, "disk"},
		{8, 0, EventCrashed, "panicked"},
		{5, 42, EventStopped, "detail-42"}, // a detail newer than this table
		{5, -1, EventStopped, "detail--1"},
		{99, 3, EventKind("event-99"), "detail-3"},
	}
	for _, tt := range tests {
		ev := lifecycleEvent(golibvirt.DomainEventLifecycleMsg{Dom: d, Event: tt.event, Detail: tt.detail})
		want := Event{Name: "vm-a", UUID: uuidN(1), ID: 7, Kind: tt.kind, Detail: tt.want}
		if ev != want {
			t.Errorf("event %d/%d: %+v, want %+v", tt.event, tt.detail, ev, want)
		}
	}
	ev := rebootEvent(golibvirt.DomainEventRebootMsg{Dom: d})
	if ev != (Event{Name: "vm-a", UUID: uuidN(1), ID: 7, Kind: EventReset}) {
		t.Errorf("reboot: %+v", ev)
	}
}

func TestRebootRecord(t *testing.T) {
	now := time.Unix(1700000000, 1)
	r := RebootRecord(now)
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	if r.Kind != record.KindReboot || r.Reboot.Reason != "guest-reset" || r.Reboot.BootID != "" || r.Time != now.UnixNano() {
		t.Fatalf("%+v %+v", r, r.Reboot)
	}
}

// fakeHost is a bridge for Follow.
type fakeHost struct {
	live    []KnownVM
	liveErr error
	resets  chan KnownVM
	torn    chan KnownVM
	resetFn func(KnownVM) error
}

func (h *fakeHost) LiveVMs() ([]KnownVM, error) { return append([]KnownVM(nil), h.live...), h.liveErr }

func (h *fakeHost) Teardown(_ context.Context, v KnownVM, reason string) error {
	for i, l := range h.live {
		if l.ID == v.ID {
			h.live = append(h.live[:i], h.live[i+1:]...)
			break
		}
	}
	h.torn <- v
	return nil
}

func (h *fakeHost) Reset(_ context.Context, v KnownVM) error {
	if h.resetFn != nil {
		if err := h.resetFn(v); err != nil {
			return err
		}
	}
	h.resets <- v
	return nil
}

// startHost is a fakeHost that hears of starts.
type startHost struct {
	*fakeHost
	starts chan KnownVM
}

func (h startHost) Started(_ context.Context, v KnownVM, _ *Client) { h.starts <- v }

// TestFollowEvents feeds events to the Watcher Follow builds.
func TestFollowEvents(t *testing.T) {
	a := vm("a", 1, 10)
	tests := []struct {
		name      string
		ev        Event
		liveErr   error
		resetErr  error
		wantReset bool
		startHost bool
		wantStart bool
		wantLog   string
	}{
		{name: "reset of a live vm", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventReset}, wantReset: true, wantLog: "vm reset recorded"},
		{name: "reset of an unknown domain", ev: Event{Name: "b", UUID: uuidN(2), Kind: EventReset}, wantLog: "without a live identity"},
		{name: "start of a live vm", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventStarted, Detail: "booted"}, startHost: true, wantStart: true, wantLog: "kind=started"},
		{name: "start, host not interested", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventStarted, Detail: "booted"}, wantLog: "kind=started"},
		{name: "start of an unknown domain", ev: Event{Name: "b", UUID: uuidN(2), Kind: EventStarted}, startHost: true, wantLog: "without a live identity"},
		{name: "same name, other uuid", ev: Event{Name: "a", UUID: uuidN(9), Kind: EventReset}, wantLog: "without a live identity"},
		{name: "lifecycle event is only logged", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventStopped, Detail: "destroyed"}, wantLog: "kind=stopped detail=destroyed"},
		{name: "store error", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventReset}, liveErr: errors.New("bolt closed"), wantLog: "bolt closed"},
		{name: "append error", ev: Event{Name: "a", UUID: uuidN(1), Kind: EventReset}, resetErr: errors.New("tpm gone"), wantLog: "tpm gone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			h := &fakeHost{live: []KnownVM{a}, liveErr: tt.liveErr, resets: make(chan KnownVM, 1), torn: make(chan KnownVM, 1),
				resetFn: func(KnownVM) error { return tt.resetErr }}
			var host Host = h
			starts := make(chan KnownVM, 1)
			if tt.startHost {
				host = startHost{h, starts}
			}
			w := Follow("", host, slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
			w.Event(context.Background(), nil, tt.ev)
			if got := len(starts); got != map[bool]int{true: 1}[tt.wantStart] {
				t.Errorf("%d starts reported", got)
			}
			select {
			case got := <-h.resets:
				if !tt.wantReset || got != a {
					t.Errorf("reset %+v", got)
				}
			default:
				if tt.wantReset {
					t.Error("no reset recorded")
				}
			}
			if !strings.Contains(buf.String(), tt.wantLog) {
				t.Errorf("log lacks %q:\n%s", tt.wantLog, buf.String())
			}
		})
	}
}

// TestFollowCoalescesResets: the firmware's resets right after a reset are
// one reboot record.
func TestFollowCoalescesResets(t *testing.T) {
	a, b := vm("a", 1, 10), vm("b", 2, 20)
	h := &fakeHost{live: []KnownVM{a, b}, resets: make(chan KnownVM, 10), torn: make(chan KnownVM, 1)}
	w := Follow("", h, slog.New(slog.DiscardHandler))
	reset := func(v KnownVM) {
		w.Event(context.Background(), nil, Event{Name: v.Name, UUID: v.UUID, Kind: EventReset})
	}
	steps := []struct {
		name  string
		do    func()
		wantN int
	}{
		{"first reset", func() { reset(a) }, 1},
		{"SeaBIOS's two resets", func() { reset(a); reset(a) }, 0},
		{"another vm", func() { reset(b) }, 1},
		{"after the window", func() { time.Sleep(ResetCoalesce + 50*time.Millisecond); reset(a) }, 1},
	}
	for _, s := range steps {
		s.do()
		if len(h.resets) != s.wantN {
			t.Fatalf("%s: %d resets recorded, want %d", s.name, len(h.resets), s.wantN)
		}
		for len(h.resets) > 0 {
			<-h.resets
		}
	}
}

// resumeHost is a fakeHost that hears of resumes.
type resumeHost struct {
	*fakeHost
	resumed chan string
}

func (h resumeHost) Resumed(_ context.Context, name string, _ [16]byte, detail string) {
	h.resumed <- name + " " + detail
}

// TestFollowResumes: a resumed event (an aborted live migration on its
// source) reaches a ResumeHost, whatever the domain; other hosts only log
// it.
func TestFollowResumes(t *testing.T) {
	h := &fakeHost{live: []KnownVM{vm("a", 1, 10)}, resets: make(chan KnownVM, 1), torn: make(chan KnownVM, 1)}
	rh := resumeHost{h, make(chan string, 2)}
	w := Follow("", rh, slog.New(slog.DiscardHandler))
	w.Event(context.Background(), nil, Event{Name: "a", UUID: uuidN(1), Kind: EventResumed, Detail: "migrated"})
	w.Event(context.Background(), nil, Event{Name: "a", UUID: uuidN(1), Kind: EventSuspended, Detail: "migrated"})
	if len(rh.resumed) != 1 || <-rh.resumed != "a migrated" {
		t.Fatal("the resumed event did not reach the host once")
	}
	w = Follow("", h, slog.New(slog.DiscardHandler))
	w.Event(context.Background(), nil, Event{Name: "a", UUID: uuidN(1), Kind: EventResumed, Detail: "migrated"})
	if len(h.resets) != 0 || len(h.torn) != 0 {
		t.Fatal("a resume changed something on a host that does not follow resumes")
	}
}
