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

// QueuedQuotes is how many evidence requests wait for the next quote, so
// that tests can wait for a queue instead of the clock.
func (m *Mux) QueuedQuotes() int {
	m.qmu.Lock()
	defer m.qmu.Unlock()
	return len(m.qpending)
}
