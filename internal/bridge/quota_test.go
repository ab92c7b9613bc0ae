package bridge

import (
	"context"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// cycle returns n real entries, the real list repeated.
func cycle(es []wire.Entry, n int) []wire.Entry {
	out := make([]wire.Entry, n)
	for i := range out {
		out[i] = es[i%len(es)]
	}
	return out
}

// verifiedRecords verifies VM ident's full evidence and returns its records.
func verifiedRecords(t *testing.T, b *Bridge, ident *conceal.Identity) (*verify.Report, []*record.Record) {
	t.Helper()
	nonce := []byte("quota-nonce of the verifier")
	ev, err := b.Mux.Evidence(context.Background(), ident.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	ev, err = evidence.Decode(raw)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AK: b.Mux.AK(), PCR: 13})
	if err != nil {
		t.Fatal(err)
	}
	var recs []*record.Record
	for _, r := range ev.Records {
		rec, err := record.Unmarshal(r.R)
		if err != nil {
			t.Fatal(err)
		}
		recs = append(recs, rec)
	}
	return rep, recs
}

func actions(recs []*record.Record) []string {
	var out []string
	for _, r := range recs {
		if r.Action != nil {
			out = append(out, r.Action.Action)
		}
	}
	return out
}

// entryBytes is what the byte quota charges for es.
func entryBytes(es []wire.Entry) int {
	n := 0
	for _, e := range es {
		n += len(e.Data) + len(e.TemplateHash) + len(e.Template)
	}
	return n
}

// TestQuotaRateSlowsNotDrops: a guest over its record rate, or its byte
// rate, is told once (naming the rate), noted once in its own log, slowed
// to the rate, and loses nothing.
func TestQuotaRateSlowsNotDrops(t *testing.T) {
	const total, frame = 1400, 100
	es := cycle(realList(t), total)
	lastFrame := entryBytes(es[total-frame:])
	all := entryBytes(es)
	tests := []struct {
		name  string
		q     Quota
		says  string
		least time.Duration // the bucket cannot admit the last frame before this
	}{
		{"records", Quota{RecordsPerSecond: 1000, RecordBurst: 200}, "records/s",
			time.Duration(float64(total-frame-200) / 1000 * float64(time.Second))},
		{"bytes", Quota{RecordsPerSecond: -1, BytesPerSecond: float64(all) / 1.5, ByteBurst: float64(all) / 10}, "bytes/s",
			time.Duration(float64(all-lastFrame-all/10) / (float64(all) / 1.5) * float64(time.Second))},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &Bridge{Mux: muxtest.Open(t, mux.Config{}), Quota: tt.q}
			ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x51, byte(i)}, Name: "vm-flood"})
			if err != nil {
				t.Fatal(err)
			}
			a, done := dial(t, b, ident.ID())
			a.Hello("boot")
			start := time.Now()
			var quotaMsgs []string
			acks := make(chan int, total/frame)
			go func() {
				defer close(acks)
				for {
					f, err := a.C.Recv()
					if err != nil {
						t.Error(err)
						return
					}
					var e wire.Error
					if f.Type == wire.TypeError && wire.Decode(f, &e) == nil && e.Code == wire.CodeQuota && !e.Fatal {
						quotaMsgs = append(quotaMsgs, e.Message)
						continue
					}
					var ack wire.Ack
					if err := wire.Decode(f, &ack); err != nil {
						t.Errorf("%v (frame %s)", err, f.Type)
						return
					}
					acks <- int(ack.Next)
					if ack.Next == total {
						return
					}
				}
			}()
			sent, acked := 0, 0
			for acked < total {
				for sent < total && sent-acked < Window*frame {
					a.Send(uint64(sent), uint64(sent/frame), es[sent:sent+frame])
					sent += frame
				}
				n, ok := <-acks
				if !ok {
					t.Fatal("acks ended early")
				}
				acked = n
			}
			took := time.Since(start)
			a.Conn.Close()
			<-done
			if took < tt.least {
				t.Fatalf("%d records acknowledged in %v: not slowed (at least %v)", total, took, tt.least)
			}
			if len(quotaMsgs) != 1 || !strings.Contains(quotaMsgs[0], tt.says) {
				t.Fatalf("quota errors %q, want exactly one naming %s (one per episode, not per frame)", quotaMsgs, tt.says)
			}
			rep, recs := verifiedRecords(t, b, ident)
			if rep.Counts.Measurements != total {
				t.Fatalf("%d measurements in the verified log, want %d: a record was dropped", rep.Counts.Measurements, total)
			}
			if got := actions(recs); !slices.Equal(got, []string{"quota-rate"}) {
				t.Fatalf("actions %v, want one quota-rate", got)
			}
			t.Logf("%d records (%d bytes) in %v (at least %v): %s", total, all, took.Round(time.Millisecond), tt.least.Round(time.Millisecond), quotaMsgs[0])
		})
	}
}

// TestQuotaRefusals: an oversize entry and a VM instance past its record
// limit are refused with a fatal quota error that names the setting; the
// refusal is noted once in the VM's own log, and nothing of the refused
// frame is acknowledged or stored.
func TestQuotaRefusals(t *testing.T) {
	es := realList(t)
	big := slices.Clone(es[:3])
	big[1].Data = make([]byte, DefaultMaxEntryBytes+1)
	tests := []struct {
		name    string
		quota   Quota
		frames  [][]wire.Entry // sent in order; the last is refused
		want    string         // in the error message
		action  string
		stored  int // measurements in the log afterwards
		retries int // reconnections that are refused again
	}{
		{"entry size", Quota{}, [][]wire.Entry{es[:5], big}, "max_entry_bytes", "quota-entry-size", 5, 0},
		{"records per instance", Quota{MaxRecords: 101}, [][]wire.Entry{es[:60], es[60:120]}, "max_records", "quota-records", 60, 2},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &Bridge{Mux: muxtest.Open(t, mux.Config{}), Quota: tt.quota}
			ident, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x52, byte(i)}, Name: "vm-q"})
			if err != nil {
				t.Fatal(err)
			}
			for try := 0; try <= tt.retries; try++ {
				a, done := dial(t, b, ident.ID())
				w := a.Hello("boot")
				next := int(w.Resume)
				last := len(tt.frames) - 1
				if try > 0 {
					last = len(tt.frames) - 1
					tt.frames = tt.frames[last:]
					last = 0
				}
				for j, fr := range tt.frames {
					a.Send(uint64(next), uint64(j+1), fr)
					f, err := a.C.Recv()
					if err != nil {
						t.Fatal(err)
					}
					if j < last {
						var ack wire.Ack
						if err := wire.Decode(f, &ack); err != nil {
							t.Fatalf("frame %d: %v", j, err)
						}
						next = int(ack.Next)
						continue
					}
					var e wire.Error
					if f.Type != wire.TypeError || wire.Decode(f, &e) != nil || e.Code != wire.CodeQuota || !e.Fatal || !strings.Contains(e.Message, tt.want) {
						t.Fatalf("got %s %+v, want a fatal quota error naming %s", f.Type, e, tt.want)
					}
					t.Logf("refused: %s", e.Message)
				}
				<-done
				a.Conn.Close()
			}
			rep, recs := verifiedRecords(t, b, ident)
			if rep.Counts.Measurements != tt.stored {
				t.Fatalf("%d measurements stored, want %d", rep.Counts.Measurements, tt.stored)
			}
			if got := actions(recs); !slices.Equal(got, []string{tt.action}) {
				t.Fatalf("actions %v, want one %s (once, not per refusal)", got, tt.action)
			}
		})
	}
}

// latencies streams frames of 8 entries every period on a session of VM
// id until stop closes, and returns each frame's ack latency.
func quietGuest(t *testing.T, b *Bridge, id conceal.Digest, es []wire.Entry, period time.Duration, stop <-chan struct{}) []time.Duration {
	a, done := dial(t, b, id)
	defer func() { a.Conn.Close(); <-done }()
	a.Hello("quiet")
	var lat []time.Duration
	tick := time.NewTicker(period)
	defer tick.Stop()
	next, seq := 0, uint64(0)
	for {
		select {
		case <-stop:
			return lat
		case <-tick.C:
		}
		seq++
		fr := make([]wire.Entry, 8)
		for i := range fr {
			fr[i] = es[(next+i)%len(es)]
		}
		t0 := time.Now()
		a.Send(uint64(next), seq, fr)
		var ack wire.Ack
		a.Recv(&ack)
		lat = append(lat, time.Since(t0))
		next += 8
	}
}

// flood streams 1024-entry frames as fast as the bridge takes them, with the
// protocol's window, until stop closes; it returns the records acknowledged.
func flood(t *testing.T, b *Bridge, id conceal.Digest, es []wire.Entry, stop <-chan struct{}) int {
	ag, host := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- b.Serve(context.Background(), id, host, false) }()
	c := wire.NewConn(ag, false)
	if err := c.Send(wire.TypeHello, &wire.Hello{Proto: wire.Version, BootID: "flood"}); err != nil {
		t.Error(err)
		return 0
	}
	if f, err := c.Recv(); err != nil || f.Type != wire.TypeWelcome {
		t.Errorf("welcome: %v %v", f.Type, err)
		return 0
	}
	const frame = 1024
	fr := cycle(es, frame)
	var mu sync.Mutex
	acked := 0
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			f, err := c.Recv()
			if err != nil {
				return
			}
			var ack wire.Ack
			if f.Type == wire.TypeAck && wire.Decode(f, &ack) == nil {
				mu.Lock()
				acked = int(ack.Next)
				mu.Unlock()
			}
		}
	}()
	sent := 0
	for {
		select {
		case <-stop:
			ag.Close()
			<-readDone
			<-done
			mu.Lock()
			defer mu.Unlock()
			return acked
		default:
		}
		mu.Lock()
		room := sent-acked < Window*frame
		mu.Unlock()
		if !room {
			time.Sleep(200 * time.Microsecond)
			continue
		}
		if err := c.Send(wire.TypeMeasurements, &wire.Measurements{Seq: uint64(sent / frame), First: uint64(sent), Entries: fr}); err != nil {
			continue // the stop closed the pipe mid-send
		}
		sent += frame
	}
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

// TestQuotaIsolation: a VM flooding at full speed beside a quiet VM that
// sends 8 records every 20 ms. With the default quota the flood is slowed
// to its rate after its burst, and the quiet VM's ack latency stays within
// the documented bound of its latency alone (measured in the same run);
// without quotas the flood fills every batch. The figures are logged for
// docs/performance.md; the assertion is on the quota'd run only.
func TestQuotaIsolation(t *testing.T) {
	if testing.Short() {
		t.Skip("timing test")
	}
	es := realList(t)
	const period, dur = 20 * time.Millisecond, 3 * time.Second
	type result struct {
		p50, p99 time.Duration
		n        int
		flooded  int
	}
	run := func(t *testing.T, q Quota, withFlood bool) result {
		b := &Bridge{Mux: muxtest.Open(t, mux.Config{}), Quota: q}
		quiet, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x53, 1}, Name: "vm-quiet"})
		if err != nil {
			t.Fatal(err)
		}
		noisy, err := b.Mux.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x53, 2}, Name: "vm-noisy"})
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		floodDone := make(chan int, 1)
		if withFlood {
			go func() { floodDone <- flood(t, b, noisy.ID(), es, stop) }()
		} else {
			floodDone <- 0
		}
		go func() { time.Sleep(dur); close(stop) }()
		lat := quietGuest(t, b, quiet.ID(), es, period, stop)
		n := <-floodDone
		// Skip the first second: the flood's burst (with the default
		// quota 50k records) is admitted at once by design.
		steady := lat[min(len(lat), int(time.Second/period)):]
		return result{p50: pct(steady, 0.5), p99: pct(steady, 0.99), n: len(steady), flooded: n}
	}
	var alone, quota, open result
	t.Run("alone", func(t *testing.T) { alone = run(t, Quota{}, false) })
	t.Run("flood-default-quota", func(t *testing.T) { quota = run(t, Quota{}, true) })
	t.Run("flood-unlimited", func(t *testing.T) { open = run(t, Unlimited, true) })
	for _, r := range []struct {
		name string
		r    result
	}{{"alone", alone}, {"beside a flood, default quota", quota}, {"beside a flood, no quota", open}} {
		t.Logf("quiet VM ack latency %-32s p50 %v p99 %v (%d acks); flood acknowledged %d records in %v",
			r.name, r.r.p50.Round(10*time.Microsecond), r.r.p99.Round(10*time.Microsecond), r.r.n, r.r.flooded, dur)
	}
	if quota.flooded > DefaultRecordBurst+int(DefaultRecordsPerSecond*dur.Seconds())+Window*1024 {
		t.Fatalf("the flood got %d records in %v past a quota of %d burst + %d/s", quota.flooded, dur, DefaultRecordBurst, DefaultRecordsPerSecond)
	}
	// The documented bound (docs/performance.md): beside a quota'd flood
	// the quiet VM's median is within its median alone + 5 ms, and its
	// p99 within its p99 alone + 50 ms. The p99 of 100 acks is their worst
	// one or two, which one scheduling stall of a shared 2-core machine
	// sets (47 ms seen with no flood at all); the median is what a flood
	// that took the committer would move (by 15 ms without quotas).
	if bound := alone.p50 + 5*time.Millisecond; quota.p50 > bound {
		t.Fatalf("quiet VM median %v beside a quota'd flood exceeds its median alone %v + 5ms", quota.p50, alone.p50)
	}
	if bound := alone.p99 + 50*time.Millisecond; quota.p99 > bound {
		t.Fatalf("quiet VM p99 %v beside a quota'd flood exceeds its p99 alone %v + 50ms", quota.p99, alone.p99)
	}
}
