package await

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestDoOr: a call that returns in time gives its result; one that
// outlives ctx gives ctx's error at once, and what it makes later is
// handed to abandon (a failed call's is not).
func TestDoOr(t *testing.T) {
	v, err := DoOr(context.Background(), func() (int, error) { return 7, nil }, nil)
	if v != 7 || err != nil {
		t.Fatalf("in time: %d, %v", v, err)
	}
	for _, fail := range []bool{false, true} {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		release := make(chan struct{})
		abandoned := make(chan int, 1)
		start := time.Now()
		_, err := DoOr(ctx, func() (int, error) {
			<-release
			if fail {
				return 0, errors.New("failed")
			}
			return 9, nil
		}, func(v int) { abandoned <- v })
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
			t.Fatalf("late call: %v after %s", err, time.Since(start))
		}
		close(release)
		select {
		case v := <-abandoned:
			if fail {
				t.Fatalf("abandon got %d from a failed call", v)
			}
			if v != 9 {
				t.Fatalf("abandon got %d", v)
			}
		case <-time.After(200 * time.Millisecond):
			if !fail {
				t.Fatal("abandon never ran on the late result")
			}
		}
	}
	if _, err := Do(canceled(), func() (int, error) { t.Fatal("ran after ctx ended"); return 0, nil }); !errors.Is(err, context.Canceled) {
		t.Fatalf("ended ctx: %v", err)
	}
}

func canceled() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// TestTimeout: a dial gets the default, or less when the context's
// deadline is sooner.
func TestTimeout(t *testing.T) {
	if got := Timeout(context.Background(), time.Second); got != time.Second {
		t.Fatalf("no deadline: %s", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if got := Timeout(ctx, time.Minute); got <= 0 || got > 100*time.Millisecond {
		t.Fatalf("deadline in 100ms: %s", got)
	}
	past, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	if got := Timeout(past, time.Minute); got > 0 {
		t.Fatalf("deadline passed: %s", got)
	}
}
