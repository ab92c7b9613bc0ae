package wal

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkGroupCommit is the write-ahead log's part of a durable vTPM
// extend, without the multiplexer: closed-loop writers each queue a
// 300-byte record and wait until it is durable, and one committer appends
// whatever is queued as one group (one write, one fdatasync). Segments
// zero-filled (the default) or growing with their writes.
//
//	go test -run '^$' -bench GroupCommit -benchtime 2000x ./internal/wal/
func BenchmarkGroupCommit(b *testing.B) {
	for _, prealloc := range []bool{false, true} {
		for _, writers := range []int{1, 10, 100} {
			b.Run(fmt.Sprintf("prealloc=%v/writers=%d", prealloc, writers), func(b *testing.B) {
				benchGroupCommit(b, !prealloc, writers)
			})
		}
	}
}

func benchGroupCommit(b *testing.B, noPrealloc bool, writers int) {
	l, err := Open(b.TempDir(), Options{NoPreallocate: noPrealloc})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	var mu sync.Mutex
	var queue []chan struct{}
	wake := make(chan struct{}, 1)
	stop := make(chan struct{})
	stopped := make(chan struct{})
	groups := 0
	go func() {
		defer close(stopped)
		rec := make([]byte, 300)
		for {
			mu.Lock()
			q := queue
			queue = nil
			mu.Unlock()
			if len(q) == 0 {
				select {
				case <-wake:
					continue
				case <-stop:
					return
				}
			}
			if _, err := l.Append(slices.Repeat(rec, len(q))); err != nil {
				panic(err)
			}
			groups++
			for _, done := range q {
				close(done)
			}
		}
	}()
	per := max(1, b.N/writers)
	lat := make([][]time.Duration, writers)
	var wg sync.WaitGroup
	b.ResetTimer()
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range per {
				t0 := time.Now()
				done := make(chan struct{})
				mu.Lock()
				queue = append(queue, done)
				mu.Unlock()
				select {
				case wake <- struct{}{}:
				default:
				}
				<-done
				lat[i] = append(lat[i], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	close(stop)
	<-stopped
	all := slices.Concat(lat...)
	slices.Sort(all)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(ms(all[len(all)/2]), "p50-ms")
	b.ReportMetric(ms(all[len(all)*99/100]), "p99-ms")
	b.ReportMetric(float64(len(all))/float64(groups), "records/group")
}
