package mux

import "time"

// TriggerSlot makes the committer's next concealment slot happen now, so
// that tests of cover leaves do not depend on the wall clock.
func (m *Mux) TriggerSlot() {
	select {
	case m.cover.kicks() <- struct{}{}:
	default:
	}
}

// SetApplyEvery sets the least time between two bbolt transactions that
// nobody waits for, so that tests can make it long enough to show.
func (m *Mux) SetApplyEvery(d time.Duration) { m.applyEvery = d }
