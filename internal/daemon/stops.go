package daemon

import (
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

// stopEventWait bounds how long a teardown waits for libvirt's stopped
// event to learn the reason.
const stopEventWait = 1500 * time.Millisecond

// pendingStop is a teardown that waits for its reason.
type pendingStop struct {
	id         conceal.Digest
	timer      *time.Timer
	awaitEvent bool // released; waiting for libvirt's stopped event's reason
}

// stopQueue is the pending-stop state machine: the teardowns that wait for
// the reason a domain stopped, at most one per domain name. libvirt's
// "stopped end" hook gives no reason and "release end" follows with it, so
// a stop waits for the release (at most stop_grace); a release that gives
// none, on a bridge that follows libvirt's events, waits for the stopped
// event's detail (at most stopEventWait). Whichever comes first of the
// awaited call, the timer, a new prepare of the name, a teardown from
// reconciliation or shutdown completes the stop, once.
type stopQueue struct {
	names *keyedMutex // the daemon's per-name lifecycle lock
	// end closes the instance's listeners and records its teardown; it is
	// called with the name's lock held.
	end func(name string, id conceal.Digest, reason string) error

	mu      sync.Mutex
	pending map[string]*pendingStop
}

func newStopQueue(names *keyedMutex, end func(name string, id conceal.Digest, reason string) error) *stopQueue {
	return &stopQueue{names: names, end: end, pending: make(map[string]*pendingStop)}
}

// wait makes instance id's teardown pending for at most d, after which it
// is recorded with reason "stopped". With awaitEvent, libvirt's stopped
// event completes it with its detail (event). A stop of the same instance
// already pending stays as it is. The caller holds the name's lock.
func (q *stopQueue) wait(name string, id conceal.Digest, d time.Duration, awaitEvent bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if p := q.pending[name]; p != nil && p.id == id {
		return
	}
	p := &pendingStop{id: id, awaitEvent: awaitEvent}
	p.timer = time.AfterFunc(d, func() { q.complete(name, p, "stopped") })
	q.pending[name] = p
}

// take removes name's pending stop, its timer stopped, and returns it (nil
// when there is none). The caller holds the name's lock and completes it.
func (q *stopQueue) take(name string) *pendingStop {
	q.mu.Lock()
	p := q.pending[name]
	delete(q.pending, name)
	q.mu.Unlock()
	if p != nil {
		p.timer.Stop()
	}
	return p
}

// drop forgets name's pending stop if it is instance id's: the caller
// tears that instance down itself and holds the name's lock.
func (q *stopQueue) drop(name string, id conceal.Digest) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if p := q.pending[name]; p != nil && p.id == id {
		p.timer.Stop()
		delete(q.pending, name)
	}
}

// complete records pending stop p of name with reason, unless it was
// completed or replaced meanwhile. It takes the name's lock.
func (q *stopQueue) complete(name string, p *pendingStop, reason string) {
	unlock := q.names.Lock(name)
	defer unlock()
	q.mu.Lock()
	mine := q.pending[name] == p
	if mine {
		delete(q.pending, name)
	}
	q.mu.Unlock()
	if mine {
		p.timer.Stop()
		q.end(name, p.id, reason)
	}
}

// event is libvirt's stopped event for domain name: it completes a
// teardown waiting for its reason.
func (q *stopQueue) event(name, detail string) {
	q.mu.Lock()
	p := q.pending[name]
	q.mu.Unlock()
	if p == nil || !p.awaitEvent {
		return
	}
	q.complete(name, p, orStopped(normReason(detail)))
}

// finish records name's waiting teardown now, as "stopped". The caller
// holds the name's lock.
func (q *stopQueue) finish(name string) {
	if p := q.take(name); p != nil {
		q.end(name, p.id, "stopped")
	}
}

// flush records every waiting teardown now (shutdown).
func (q *stopQueue) flush() {
	q.mu.Lock()
	names := make([]string, 0, len(q.pending))
	for n := range q.pending {
		names = append(names, n)
	}
	q.mu.Unlock()
	for _, n := range names {
		unlock := q.names.Lock(n)
		q.finish(n)
		unlock()
	}
}
