package daemon

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
)

// BenchmarkMigrationLifecycle is what the bridges add to a live migration
// as libvirt drives them, through the control socket as the hook calls it,
// on two daemons with their log stores fsynced (the source on the
// simulator, the destination on swtpm): migrate-ms is the destination's
// "migrate begin" (the reservation at the source: before QEMU moves any
// memory); arrival-ms runs from the source's "release end" (reason
// migrated) to the VM served on the destination (the handover, MigrateOut
// and MigrateIn: what the guest's first record or vTPM command on the
// destination waits for). The hook process's own start (a few ms of
// fork and exec) is not included.
//
//	go test -run XXX -bench MigrationLifecycle -benchtime 20x ./internal/daemon
func BenchmarkMigrationLifecycle(b *testing.B) {
	for _, tc := range []struct {
		name     string
		interval time.Duration // the concealment slot; 0: concealment off
	}{{"conceal-off", 0}, {"conceal-20ms", 20 * time.Millisecond}, {"conceal-1s-default", time.Second}} {
		b.Run(tc.name, func(b *testing.B) { benchLifecycle(b, tc.interval) })
	}
}

func benchLifecycle(b *testing.B, interval time.Duration) {
	a, d := migHostsWith(b, func(e *env) {
		if interval == 0 {
			e.cfg.Conceal.Pad = -1
		} else {
			e.cfg.Conceal.Interval = Duration(interval)
		}
	})
	var begin, arrival []time.Duration
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("vm-b%d", i)
		uuid := fmt.Sprintf("0b5e1c7a-8d2f-4e61-9a3b-%012x", i)
		xa, xd := a.domainXML(name, uuid), d.domainXML(name, uuid)
		a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
		t0 := time.Now()
		d.mustCall(&control.Request{Op: control.OpMigrate, Name: name, XML: xd})
		begin = append(begin, time.Since(t0))
		d.mustCall(&control.Request{Op: control.OpPrepare, XML: xd})
		d.mustCall(&control.Request{Op: control.OpStarted, Name: name, XML: xd})
		a.mustCall(&control.Request{Op: control.OpStopped, Name: name, Reason: "-"})
		t1 := time.Now()
		a.mustCall(&control.Request{Op: control.OpRelease, Name: name, Reason: "migrated"})
		for d.d.incomingOf(name) != nil {
			time.Sleep(100 * time.Microsecond)
		}
		arrival = append(arrival, time.Since(t1))
		if _, ok := d.d.mux.Lookup(name); !ok {
			b.Fatalf("%s did not arrive", name)
		}
		// Not timed: the VM stops on the destination.
		d.mustCall(&control.Request{Op: control.OpStopped, Name: name, Reason: "destroyed"})
	}
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2].Microseconds()) / 1000
	}
	mean := func(ds []time.Duration) float64 {
		var t time.Duration
		for _, x := range ds {
			t += x
		}
		return float64(t.Microseconds()) / 1000 / float64(len(ds))
	}
	b.ReportMetric(mean(begin), "migrate-ms")
	b.ReportMetric(mean(arrival), "arrival-ms")
	b.ReportMetric(med(begin), "p50-migrate-ms")
	b.ReportMetric(med(arrival), "p50-arrival-ms")
}
