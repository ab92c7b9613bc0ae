package mux

import "time"

// QuoteBatchObserver is an Observer that also learns how the evidence
// requests were batched into quotes, to tell whether quotes are shared as
// they should be. The mux calls QuoteBatch on its quote loop's goroutine,
// once for every quote it takes for evidence requests (not with
// NoQuoteBatching), just before the quote: requests is how many requests the
// quote answers, awaited how many the loop waited to gather before it (the
// requesters the previous quote served and those that queued during it; 0
// when it did not wait), and waited how long it waited.
type QuoteBatchObserver interface {
	Observer
	QuoteBatch(requests, awaited int, waited time.Duration)
}

func (m *Mux) observeQuoteBatch(requests, awaited int, waited time.Duration) {
	if o, ok := m.cfg.Observer.(QuoteBatchObserver); ok {
		o.QuoteBatch(requests, awaited, waited)
	}
}
