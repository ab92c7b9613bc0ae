package mux

import (
	"testing"
	"time"
)

// TestGatherWait: after an extend answered anchored guests the committer
// holds the next batch while fewer records are queued than guests were
// answered, until none came for gatherIdle or gatherMax passed (after a
// slow extend, a sixth of it and the whole of it); a queued record whose
// guest waits only for durability ends the wait at once, and without
// answered guests nothing is held.
func TestGatherWait(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name    string
		g       gatherState
		n       int
		durable int
		ext     time.Duration // the last extend's duration
		hold    bool
	}{
		{"no anchored guest answered", gatherState{}, 1, 0, 0, false},
		{"first guest back, others due", gatherState{want: 10, since: now, last: now}, 1, 0, 0, true},
		{"none back yet", gatherState{want: 10, since: now, last: now}, 0, 0, 0, true},
		{"all back", gatherState{want: 10, since: now, last: now}, 10, 0, 0, false},
		{"more than answered", gatherState{want: 10, since: now, last: now}, 12, 0, 0, false},
		{"a durable guest waits", gatherState{want: 10, since: now, last: now}, 3, 1, 0, false},
		{"idle since the last arrival", gatherState{want: 10, since: now.Add(-gatherMax / 2), last: now.Add(-2 * gatherIdle)}, 3, 0, 0, false},
		{"cap passed while arrivals go on", gatherState{want: 10, since: now.Add(-2 * gatherMax), last: now}, 3, 0, 0, false},
		{"fast extend: the fixed cap", gatherState{want: 10, since: now.Add(-2 * gatherMax), last: now}, 3, 0, 50 * time.Microsecond, false},
		{"slow extend: held past the fixed cap", gatherState{want: 10, since: now.Add(-2 * gatherMax), last: now}, 3, 0, 3 * gatherMax, true},
		{"slow extend: its cap passed", gatherState{want: 10, since: now.Add(-4 * gatherMax), last: now}, 3, 0, 3 * gatherMax, false},
		{"slow extend: a gap under a sixth of it", gatherState{want: 10, since: now.Add(-gatherMax), last: now.Add(-3 * gatherMax / 10)}, 3, 0, 3 * gatherMax, true},
		{"slow extend: a gap over a sixth of it", gatherState{want: 10, since: now.Add(-gatherMax), last: now.Add(-6 * gatherMax / 10)}, 3, 0, 3 * gatherMax, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := &Mux{regather: tc.g, durableWaiters: tc.durable}
			m.lastExtend.Store(int64(tc.ext))
			w := m.gatherWait(tc.n, now)
			if got := w > 0; got != tc.hold {
				t.Fatalf("gatherWait(%d) = %v, want holding %v", tc.n, w, tc.hold)
			}
			if limit := max(gatherMax, tc.ext); w > limit {
				t.Fatalf("gatherWait(%d) = %v, more than %v", tc.n, w, limit)
			}
		})
	}
}
