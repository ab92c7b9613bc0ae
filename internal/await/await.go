// Package await runs blocking calls that take no context (go-libvirt's and
// go-qemu's) so that a caller's context still bounds how long it waits.
package await

import "context"

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
