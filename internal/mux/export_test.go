package mux

// TriggerSlot makes the committer's next concealment slot happen now, so
// that tests of cover leaves do not depend on the wall clock.
func (m *Mux) TriggerSlot() {
	select {
	case m.cover.kicks() <- struct{}{}:
	default:
	}
}

// QueuedQuotes is how many evidence requests wait for the next quote, so
// that tests can wait for a queue instead of the clock.
func (m *Mux) QueuedQuotes() int {
	m.qmu.Lock()
	defer m.qmu.Unlock()
	return len(m.qpending)
}
