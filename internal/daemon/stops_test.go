package daemon

import (
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// TestStopQueue drives the pending-stop state machine on its own: each
// way a waiting teardown completes records it exactly once, with the
// reason that way carries, and the ways that cancel it record nothing.
func TestStopQueue(t *testing.T) {
	id := conceal.Digest{7}
	const long, short = time.Hour, 30 * time.Millisecond
	tests := []struct {
		name  string
		wait  time.Duration
		event bool // awaitEvent
		do    func(q *stopQueue)
		want  []string // reasons recorded, in order
	}{
		{name: "timer ends it as stopped", wait: short, want: []string{"stopped"}},
		{name: "stopped event gives the reason", wait: long, event: true,
			do: func(q *stopQueue) { q.event("vm", "crashed") }, want: []string{"crashed"}},
		{name: "event ignored when not awaited", wait: short,
			do: func(q *stopQueue) { q.event("vm", "crashed") }, want: []string{"stopped"}},
		{name: "event for another name ignored", wait: long, event: true,
			do: func(q *stopQueue) { q.event("other", "crashed") }},
		{name: "take hands it to the caller", wait: short,
			do: func(q *stopQueue) {
				if p := q.take("vm"); p == nil || p.id != id {
					t.Errorf("take = %+v", p)
				}
			}},
		{name: "drop of this instance cancels it", wait: short,
			do: func(q *stopQueue) { q.drop("vm", id) }},
		{name: "drop of another instance keeps it", wait: short,
			do: func(q *stopQueue) { q.drop("vm", conceal.Digest{8}) }, want: []string{"stopped"}},
		{name: "finish records it now", wait: long,
			do: func(q *stopQueue) { q.finish("vm") }, want: []string{"stopped"}},
		{name: "flush records it now", wait: long,
			do: func(q *stopQueue) { q.flush() }, want: []string{"stopped"}},
		{name: "a second wait for the instance is one stop", wait: short,
			do: func(q *stopQueue) { q.wait("vm", id, short, false) }, want: []string{"stopped"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var names keyedMutex
			var mu sync.Mutex
			var got []string
			q := newStopQueue(&names, func(name string, gotID conceal.Digest, reason string) error {
				mu.Lock()
				defer mu.Unlock()
				if name != "vm" || gotID != id {
					t.Errorf("ended %s %x", name, gotID[:1])
				}
				got = append(got, reason)
				return nil
			})
			q.wait("vm", id, tc.wait, tc.event)
			if tc.do != nil {
				tc.do(q)
			}
			// Wait for the ends expected (timers may run late on a loaded
			// machine), then a little more for any that should not come.
			deadline := time.Now().Add(10 * time.Second)
			for {
				mu.Lock()
				n := len(got)
				mu.Unlock()
				if n >= len(tc.want) || time.Now().After(deadline) {
					break
				}
				time.Sleep(short)
			}
			time.Sleep(5 * short)
			mu.Lock()
			defer mu.Unlock()
			if len(got) != len(tc.want) || (len(got) > 0 && got[0] != tc.want[0]) {
				t.Fatalf("recorded %q, want %q", got, tc.want)
			}
		})
	}
}
