// Package await runs blocking calls that take no context (go-libvirt's and
// go-qemu's) so that a caller's context still bounds how long it waits.
package await

import (
	"context"
	"time"
)

// Do runs f and returns its result, or ctx's error as soon as ctx ends
// first; f then finishes in the background and its result is dropped.
func Do[T any](ctx context.Context, f func() (T, error)) (T, error) {
	return DoOr(ctx, f, nil)
}

// DoOr is Do for an f that makes something to release (a connection, a
// channel to drain): when ctx ends first, abandon runs in the background on
// what f returns, once it does, if f succeeded. abandon may be nil.
func DoOr[T any](ctx context.Context, f func() (T, error), abandon func(T)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := f()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		if abandon != nil {
			go func() {
				if r := <-ch; r.err == nil {
					abandon(r.v)
				}
			}()
		}
		return zero, ctx.Err()
	}
}

// Timeout is the time a call that takes a timeout instead of a context
// (a dial) may have under ctx: def, or what is left of ctx's deadline when
// that is sooner. It is zero or less when ctx has no time left.
func Timeout(ctx context.Context, def time.Duration) time.Duration {
	if dl, ok := ctx.Deadline(); ok {
		return min(def, time.Until(dl))
	}
	return def
}
