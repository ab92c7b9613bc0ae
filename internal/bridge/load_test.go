package bridge

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// TestLoad: many VMs stream at once while verifiers poll for evidence and
// verify it. Bounded and self-stopping (TPMMUX_LOAD_SECONDS, default 2;
// TPMMUX_LOAD_VMS, default 40). No error is allowed, every evidence must
// verify, and the heap must stay bounded.
func TestLoad(t *testing.T) {
	secs, vms := 2, 40
	if v, err := strconv.Atoi(os.Getenv("TPMMUX_LOAD_SECONDS")); err == nil && v > 0 {
		secs = v
	}
	if v, err := strconv.Atoi(os.Getenv("TPMMUX_LOAD_VMS")); err == nil && v > 0 {
		vms = v
	}
	b := newBridge(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second)
	defer cancel()
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap0 := ms.HeapInuse

	idents := make([]*conceal.Identity, vms)
	for i := range idents {
		id, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x10, byte(i >> 8), byte(i)}, Name: fmt.Sprintf("load-%03d", i)})
		if err != nil {
			t.Fatal(err)
		}
		idents[i] = id
	}
	var acked, verified atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, vms+16)
	for i, ident := range idents {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := loadGuest(ctx, b, ident.ID(), i, &acked); err != nil {
				errs <- fmt.Errorf("vm %d: %w", i, err)
			}
		}()
	}
	for v := 0; v < 4; v++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ctx.Err() == nil; j++ {
				ident := idents[(v*7+j)%len(idents)]
				nonce := make([]byte, 20)
				rand.Read(nonce)
				ev, err := b.Mux.Evidence(context.Background(), ident.ID(), nonce)
				if err != nil {
					errs <- fmt.Errorf("verifier %d: evidence: %w", v, err)
					return
				}
				if _, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AK: b.Mux.AK(), PCR: 13}); err != nil {
					errs <- fmt.Errorf("verifier %d: %w", v, err)
					return
				}
				verified.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&ms)
	st := b.Mux.Status()
	hwm := "?"
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmHWM:") {
				hwm = strings.TrimSpace(strings.TrimPrefix(l, "VmHWM:"))
			}
		}
	}
	t.Logf("%d VMs for %ds: %d records acknowledged (%.0f/s), %d evidence verified, %d batches (largest %d); heap in use %d MB -> %d MB, peak RSS %s",
		vms, secs, acked.Load(), float64(acked.Load())/float64(secs), verified.Load(), st.Stats.Batches, st.Stats.MaxBatch, heap0>>20, ms.HeapInuse>>20, hwm)
	if acked.Load() == 0 || verified.Load() == 0 {
		t.Fatal("the load did nothing")
	}
	if ms.HeapInuse > 512<<20 {
		t.Fatalf("heap in use %d MB after the load", ms.HeapInuse>>20)
	}
}

// loadGuest streams synthetic ima-ng entries as fast as the window allows
// until ctx ends.
func loadGuest(ctx context.Context, b *Bridge, id conceal.Digest, n int, acked *atomic.Int64) error {
	ag, host := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), id, host, false) }()
	defer func() { ag.Close(); <-done }()
	c := wire.NewConn(ag, false)
	if err := c.Send(wire.TypeHello, &wire.Hello{Proto: wire.Version, BootID: "load"}); err != nil {
		return err
	}
	f, err := c.Recv()
	if err != nil || f.Type != wire.TypeWelcome {
		return fmt.Errorf("welcome: %v %v", f.Type, err)
	}
	acks := make(chan error, 1)
	inflight := make(chan struct{}, Window)
	go func() {
		for {
			f, err := c.Recv()
			if err != nil {
				acks <- nil
				return
			}
			if f.Type != wire.TypeAck {
				acks <- fmt.Errorf("got %s", f.Type)
				return
			}
			var a wire.Ack
			wire.Decode(f, &a)
			acked.Add(32)
			<-inflight
		}
	}()
	next := uint64(0)
	for seq := uint64(1); ctx.Err() == nil; seq++ {
		es := make([]wire.Entry, 32)
		for i := range es {
			p := fmt.Sprintf("/load/%d/bin/%d", n, next+uint64(i))
			e := ima.NewIMANG(10, "sha256", make([]byte, 32), p)
			es[i] = wire.Entry{PCR: 10, HashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, Data: e.TemplateData}
		}
		select {
		case inflight <- struct{}{}:
		case <-ctx.Done():
			continue
		case err := <-acks:
			return err
		}
		if err := c.Send(wire.TypeMeasurements, &wire.Measurements{Seq: seq, First: next, Entries: es}); err != nil {
			if strings.Contains(err.Error(), "closed") {
				return nil
			}
			return err
		}
		next += 32
	}
	return nil
}

// TestHostWideBudget: however many VMs stream, the records submitted and
// not yet settled never exceed the bridge's host-wide budget, and every
// VM still gets through.
func TestHostWideBudget(t *testing.T) {
	b := newBridge(t)
	b.MaxQueued = 96
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	const vms = 12
	var acked atomic.Int64
	var per [vms]atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < vms; i++ {
		ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x20, byte(i)}, Name: fmt.Sprintf("budget-%02d", i)})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := loadGuest(ctx, b, ident.ID(), i, &per[i]); err != nil {
				t.Error(err)
			}
		}()
	}
	maxQueued := 0
	for ctx.Err() == nil {
		maxQueued = max(maxQueued, b.Mux.Status().Queued)
		time.Sleep(200 * time.Microsecond)
	}
	wg.Wait()
	for i := range per {
		if per[i].Load() == 0 {
			t.Errorf("vm %d got nothing through", i)
		}
		acked.Add(per[i].Load())
	}
	t.Logf("%d VMs, budget %d: %d records acknowledged, at most %d queued in the mux", vms, b.MaxQueued, acked.Load(), maxQueued)
	if maxQueued > b.MaxQueued {
		t.Fatalf("%d records queued, budget %d", maxQueued, b.MaxQueued)
	}
}
