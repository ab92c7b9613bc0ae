// Package vtpmtest holds test doubles for package vtpm.
package vtpmtest

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Journal is an in-memory vtpm.Journal. It is a TEST DOUBLE: it makes
// nothing durable and anchors nothing; the multiplexer's journal does that
// in production. It keeps every event in order and can delay or refuse
// appends to exercise the vTPM's waiting and error paths.
type Journal struct {
	mu     sync.Mutex
	events []vpcr.Event
	delay  time.Duration
	fail   error
}

// Append records e (after the configured delay, or fails with the
// configured error, recording nothing).
func (j *Journal) Append(ctx context.Context, e vpcr.Event) error {
	j.mu.Lock()
	delay, fail := j.delay, j.fail
	j.mu.Unlock()
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if fail != nil {
		return fail
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.events = append(j.events, e)
	return nil
}

// Events returns a copy of the recorded events.
func (j *Journal) Events() []vpcr.Event {
	j.mu.Lock()
	defer j.mu.Unlock()
	return slices.Clone(j.events)
}

// SetDelay makes every later Append wait d first.
func (j *Journal) SetDelay(d time.Duration) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.delay = d
}

// SetFail makes every later Append fail with err (nil: succeed again).
func (j *Journal) SetFail(err error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.fail = err
}
