package mux

import "time"

// Observer receives per-operation measurements, for metrics. Set it in
// Config.Observer. Its methods are called on the committer's goroutine or
// under the commit lock: they must be fast, must not block and must not call
// back into the Mux.
type Observer interface {
	// Batch is called once for every batch that is durable and extended,
	// with the number of records it holds.
	Batch(records int)
	// Extend is called after every TPM2_PCR_Extend of the mux PCR (batches,
	// epoch records, recoveries) with how long it took.
	Extend(d time.Duration)
	// Quote is called after every quote the mux takes (evidence and final
	// quotes) with how long it took: PCR read, TPM2_Quote and the check of
	// the quote against the AK.
	Quote(d time.Duration)
}

func (m *Mux) observeBatch(n int) {
	if o := m.cfg.Observer; o != nil {
		o.Batch(n)
	}
}

func (m *Mux) observeExtend(d time.Duration) {
	if o := m.cfg.Observer; o != nil {
		o.Extend(d)
	}
}

func (m *Mux) observeQuote(d time.Duration) {
	if o := m.cfg.Observer; o != nil {
		o.Quote(d)
	}
}
