package logstore

import (
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCompactInUse compacts a store while other goroutines read and write
// it, as the bridge does when retention forgets a VM: no transaction fails,
// and every write made before or during the compaction is there after it.
func TestCompactInUse(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "log.db"), &Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.BeginEpoch(1, []byte{0xa0}, Batch{G0: 0, N: 1, Epoch: []byte{0xa0}}, time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	var written sync.Map
	var writes atomic.Int64
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := [32]byte{byte(w), byte(i), byte(i >> 8)}
				if err := s.PutFinal(id, &FinalQuote{Epoch: 1, Attest: []byte{byte(i)}}); err != nil {
					errs <- err
					return
				}
				written.Store(id, true)
				writes.Add(1)
				if _, ok, err := s.CurrentEpoch(); err != nil || !ok {
					errs <- err
					return
				}
			}
		}()
	}
	for range 3 {
		// Let the writers get some transactions in first, however loaded
		// the machine.
		deadline := time.Now().Add(10 * time.Second)
		for w0 := writes.Load(); writes.Load() < w0+5; {
			if time.Now().After(deadline) {
				t.Fatal("the writers stopped writing")
			}
			time.Sleep(time.Millisecond)
		}
		if err := s.Compact(); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("transaction during compaction: %v", err)
	}
	n := 0
	written.Range(func(k, _ any) bool {
		n++
		id := k.([32]byte)
		if err := s.View(func(sn *Snapshot) error { _, err := sn.Final(id); return err }); err != nil {
			t.Fatalf("final quote %x lost by the compaction: %v", id[:3], err)
		}
		return true
	})
	if n == 0 {
		t.Fatal("no writes ran during the compactions")
	}
}
