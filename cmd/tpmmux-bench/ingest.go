package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// ingestResult is one P1/P2 run.
type ingestResult struct {
	rate      float64         // records made durable and extended per second
	acked     float64         // records acknowledged to guests per second
	lat       []time.Duration // ack latency of every frame acknowledged in the window, sorted
	oldest    time.Duration   // age of the oldest frame still unacknowledged at the end
	batch     float64         // mean records per batch in the window
	extend    time.Duration   // mean TPM2_PCR_Extend time in the window
	batches   uint64
	skipped   int  // paced sends skipped for a full window (saturated)
	steady    bool // not saturated: the latencies are the pipeline's, not a backlog's
	inflight  int  // records a guest may have unacknowledged (window × frame)
	connect   time.Duration
	cpuPerRec time.Duration // process CPU time (bridge and guests) per record // setting up every guest's session (hello, welcome)
	// paced is the disk alone at a paced group-commit run's pace
	// (pacedFsync: one write + fdatasync per write-ahead log write the
	// window made), sorted; nil for the other runs.
	paced []time.Duration
}

// makeVMs gives n VMs an identity and a durable, extended genesis record
// with a default (group-committing) multiplexer, and closes it: the run
// then reopens the store with the configuration under test, so setting up
// 1000 VMs does not cost a one-extend-per-record baseline minutes.
func makeVMs(ctx context.Context, t tpm.TPM, st *logstore.Store, n int) ([]*conceal.Identity, error) {
	m, err := mux.Open(ctx, t, st, mux.Config{Host: "bench", Version: "bench", Logger: quiet})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if f := m.Status().Fault; f != "" {
		return nil, fmt.Errorf("multiplexer faulted: %s", f)
	}
	idents := make([]*conceal.Identity, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 256)
	var wg sync.WaitGroup
	for i := range idents {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var u [16]byte
			u[0], u[1], u[15] = byte(i>>8), byte(i), 0xbe
			idents[i], errs[i] = m.NewVM(ctx, mux.Launch{UUID: u, Name: fmt.Sprintf("bench-%04d", i), CID: uint32(3 + i)})
		})
	}
	wg.Wait()
	return idents, errors.Join(errs...)
}

// sent is one frame in flight.
type sent struct {
	t time.Time
	n int
}

// ingestClient is one guest streaming measurement frames with the
// protocol's window.
type ingestClient struct {
	conn   net.Conn
	wc     *wire.Conn
	next   uint64
	window int
	slots  chan struct{} // one per unacknowledged frame

	mu       sync.Mutex
	inflight []sent // unacknowledged frames, oldest first
	lats     []time.Duration
	ackedRec int64
	skipped  int
	gotAck   atomic.Bool
	err      error
}

// runIngest is one P1/P2 run: vms guests stream frames from fr through the
// bridge into a multiplexer with maxBatch (0: default). With pace 0 every
// guest keeps its window full (saturation); otherwise it sends one frame
// per pace (random phase), when its window has room.
func (e *env) runIngest(ctx context.Context, kind string, vms, maxBatch int, fr *frames, pace, warmMax, dur time.Duration) (*ingestResult, error) {
	r, err := e.openMuxRig(ctx, kind, "ingest-", vms, nil, mux.Config{MaxBatch: maxBatch})
	if err != nil {
		return nil, err
	}
	defer r.close()
	m := r.m
	// P1 measures the bridge's raw throughput: no per-VM quota.
	br := &bridge.Bridge{Mux: m, Log: quiet, Quota: bridge.Unlimited}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Connect every guest: hello, welcome.
	tc := time.Now()
	var serveWG sync.WaitGroup
	defer serveWG.Wait()
	clients, err := connectGuests(sctx, br, r.idents, &serveWG)
	closeAll := func() {
		for _, c := range clients {
			if c != nil {
				c.conn.Close()
			}
		}
	}
	defer closeAll()
	if err != nil {
		return nil, err
	}

	connect := time.Since(tc)
	var measuring atomic.Bool
	stop := make(chan struct{})
	var cwg sync.WaitGroup
	for i, c := range clients {
		cwg.Go(func() { c.send(fr, i*7, pace, stop) })
		cwg.Go(func() { c.receive(&measuring) })
	}
	// Warm up until every guest has had an acknowledgement (the pipeline
	// is full), or warmMax.
	deadline := time.Now().Add(warmMax)
	allAcked := false
	for !allAcked && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
		allAcked = true
		for _, c := range clients {
			if !c.gotAck.Load() {
				allAcked = false
				break
			}
		}
	}
	s0 := m.Status().Stats
	c0 := cpuTime()
	t0 := time.Now()
	measuring.Store(true)
	time.Sleep(dur)
	measuring.Store(false)
	s1 := m.Status().Stats
	el := time.Since(t0)
	cpu := cpuTime() - c0

	// End the run at once: fail whatever is still queued.
	r.rt.g.stop()
	close(stop)
	cancel()
	closeAll()
	cwg.Wait()

	res := &ingestResult{connect: connect}
	if err := res.collect(clients, s0, s1, el, cpu, t0.Add(el), fr.size); err != nil {
		return nil, err
	}
	// A paced run is saturated when a guest's window was full at one of its
	// ticks (the bridge did not keep up with the offered load); a streaming
	// run is in its steady state once every guest has had an ack.
	if pace > 0 {
		res.steady = res.skipped == 0 && len(res.lat) > 0
		if w := s1.Writes - s0.Writes; w > 0 && maxBatch != 1 {
			gap := max(0, el/time.Duration(w)-e.fsync)
			if res.paced, err = pacedFsync(r.dir, gap, time.Second); err != nil {
				return nil, fmt.Errorf("paced fsync: %w", err)
			}
		}
	} else {
		res.steady = allAcked && len(res.lat) > 0
	}
	return res, nil
}

// connectGuests connects one guest per identity to br (each served on its
// own goroutine in serveWG until ctx ends) and has each say hello, 64 at a
// time. The clients it returns (some nil after an error) are the caller's
// to close.
func connectGuests(ctx context.Context, br *bridge.Bridge, idents []*conceal.Identity, serveWG *sync.WaitGroup) ([]*ingestClient, error) {
	clients := make([]*ingestClient, len(idents))
	errs := make([]error, len(idents))
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range clients {
		g, b, err := socketPair()
		if err != nil {
			errs[i] = err
			break
		}
		id := idents[i].ID()
		serveWG.Go(func() { br.Serve(ctx, id, b, false) })
		c := &ingestClient{conn: g, wc: wire.NewConn(g, false)}
		clients[i] = c
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[i] = c.hello()
		})
	}
	wg.Wait()
	return clients, errors.Join(errs...)
}

// collect fills res from the multiplexer's statistics before (s0) and
// after (s1) the measured window el, the process's CPU time in it, and
// what each client measured; end is the window's end, frame the records
// per frame.
func (res *ingestResult) collect(clients []*ingestClient, s0, s1 mux.Stats, el, cpu time.Duration, end time.Time, frame int) error {
	res.rate = float64(s1.Records-s0.Records) / el.Seconds()
	res.batches = s1.Batches - s0.Batches
	if n := s1.Records - s0.Records; n > 0 {
		res.cpuPerRec = cpu / time.Duration(n)
	}
	if res.batches > 0 {
		res.batch = float64(s1.Records-s0.Records) / float64(res.batches)
	}
	if n := s1.Extends - s0.Extends; n > 0 {
		res.extend = time.Duration((s1.ExtendNanos - s0.ExtendNanos) / n)
	}
	var acked int64
	for _, c := range clients {
		c.mu.Lock()
		res.lat = append(res.lat, c.lats...)
		acked += c.ackedRec
		res.skipped += c.skipped
		res.inflight = c.window * frame
		if len(c.inflight) > 0 {
			res.oldest = max(res.oldest, end.Sub(c.inflight[0].t))
		}
		err := c.err
		c.mu.Unlock()
		if err != nil {
			return err
		}
	}
	res.acked = float64(acked) / el.Seconds()
	slices.Sort(res.lat)
	return nil
}

func (c *ingestClient) hello() error {
	c.conn.SetDeadline(time.Now().Add(time.Minute))
	defer c.conn.SetDeadline(time.Time{})
	if err := c.wc.Send(wire.TypeHello, &wire.Hello{Proto: wire.Version, AgentVersion: "bench", BootID: "bench-boot"}); err != nil {
		return err
	}
	f, err := c.wc.Recv()
	if err != nil {
		return fmt.Errorf("read welcome: %w", err)
	}
	if f.Type == wire.TypeError {
		var we wire.Error
		wire.Decode(f, &we)
		return &we
	}
	var w wire.Welcome
	if err := wire.Decode(f, &w); err != nil {
		return err
	}
	c.next, c.window = w.Resume, max(1, int(w.Window))
	c.slots = make(chan struct{}, c.window)
	return nil
}

// send streams frames, at most the window unacknowledged; with pace > 0,
// one frame per pace at most.
func (c *ingestClient) send(fr *frames, k int, pace time.Duration, stop <-chan struct{}) {
	var buf []byte
	var tick <-chan time.Time
	if pace > 0 {
		// A random phase, so the guests do not send in lockstep.
		select {
		case <-time.After(time.Duration(rand.Int64N(int64(pace)))):
		case <-stop:
			return
		}
		t := time.NewTicker(pace)
		defer t.Stop()
		tick = t.C
	}
	for seq := uint64(1); ; seq++ {
		if tick != nil {
			select {
			case <-tick:
			case <-stop:
				return
			}
			select {
			case c.slots <- struct{}{}:
			default:
				// The window is full: this guest is not keeping up its
				// pace (the bridge is saturated); skip the tick.
				c.mu.Lock()
				c.skipped++
				c.mu.Unlock()
				seq--
				continue
			}
		} else {
			select {
			case c.slots <- struct{}{}:
			case <-stop:
				return
			}
		}
		var n int
		buf, n = fr.frame(buf[:0], k, seq, c.next)
		k++
		c.mu.Lock()
		c.inflight = append(c.inflight, sent{time.Now(), n})
		c.mu.Unlock()
		if _, err := c.conn.Write(buf); err != nil {
			return
		}
		c.next += uint64(n)
	}
}

// receive reads acks and timestamps them.
func (c *ingestClient) receive(measuring *atomic.Bool) {
	for {
		f, err := c.wc.Recv()
		if err != nil {
			return
		}
		switch f.Type {
		case wire.TypeAck:
			now := time.Now()
			c.mu.Lock()
			if len(c.inflight) > 0 {
				f := c.inflight[0]
				c.inflight = c.inflight[1:]
				if measuring.Load() {
					c.lats = append(c.lats, now.Sub(f.t))
					c.ackedRec += int64(f.n)
				}
			}
			c.mu.Unlock()
			c.gotAck.Store(true)
			select {
			case <-c.slots:
			default:
			}
		case wire.TypeError:
			var we wire.Error
			wire.Decode(f, &we)
			c.mu.Lock()
			if measuring.Load() && c.err == nil {
				c.err = fmt.Errorf("bridge refused a frame during the measurement: %w", &we)
			}
			c.mu.Unlock()
			return
		}
	}
}
