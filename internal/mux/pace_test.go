package mux_test

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/mux/muxtest"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/hwprofile"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// slowMux is a multiplexer on the simulator whose extend takes ext.
func slowMux(t *testing.T, cfg mux.Config, ext time.Duration) *mux.Mux {
	t.Helper()
	return muxtest.OpenWrapped(t, cfg, func(tp tpm.TPM) tpm.TPM {
		return hwprofile.Wrap(tp, hwprofile.Profile{Extend: ext})
	})
}

// vtpmVM starts a VM with a vTPM and sends its Init and Startup events.
func vtpmVM(t *testing.T, m *mux.Mux, name string) conceal.Digest {
	t.Helper()
	ctx := context.Background()
	id, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x72, name[len(name)-1]}, Name: name, VTPMBanks: []uint16{uint16(vpcr.SHA256)}})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Command: 0x144, Banks: []vpcr.Alg{vpcr.SHA256}}} {
		if err := m.Journal(id.ID(), false).Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	return id.ID()
}

// TestDurableEventsPaced: a closed-loop guest in mode durable on a TPM
// whose extend takes 4 ms has most of its events staged while an extend
// is busy. Their batch rides in the write that stages the guest's next
// event, so each event costs one write-ahead log write (one fdatasync).
// Cut the moment the extend frees, each batch would cost a write of its
// own, which the guest's next event waits for.
func TestDurableEventsPaced(t *testing.T) {
	ctx := context.Background()
	m := slowMux(t, mux.Config{}, 4*time.Millisecond)
	j := m.Journal(vtpmVM(t, m, "vm-1"), false)
	const events = 200
	before := m.Status()
	for k := range events {
		if err := j.Append(ctx, ext(byte(k))); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Microsecond) // the guest's work until its next event
	}
	after := m.Status()
	writes := after.Stats.Writes - before.Stats.Writes
	batches := after.Batches - before.Batches
	extra := int64(writes) - events
	t.Logf("%d durable events: %d write-ahead log writes, %d batches", events, writes, batches)
	if batches < 10 {
		t.Fatalf("%d batches for %d events on a 4 ms extend: the test did not keep the extend busy", batches, events)
	}
	if extra > int64(batches)/2+2 { // a loaded machine may pause the guest past the pace
		t.Errorf("%d writes for %d events in %d batches: %d batches were written on their own instead of with the next event", writes, events, batches, extra)
	}
}

// TestHeartbeatDoesNotHoldDurable: a concealment slot that comes while an
// extend is busy does not hold the committer until the extend frees: a
// durable event staged meanwhile returns at once. The heartbeat still
// happens once the extend is done.
func TestHeartbeatDoesNotHoldDurable(t *testing.T) {
	ctx := context.Background()
	const extend = 400 * time.Millisecond
	m := slowMux(t, mux.Config{Cover: mux.Cover{Pad: 4, Interval: time.Hour}}, extend)
	j := m.Journal(vtpmVM(t, m, "vm-1"), false)
	if err := j.Append(ctx, ext(1)); err != nil {
		t.Fatal(err)
	}
	m.TriggerSlot() // an extend of 400 ms is busy
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	if err := j.Append(ctx, ext(2)); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > extend/2 {
		t.Fatalf("a durable event took %v with a heartbeat due while a %v extend was busy: the heartbeat held the committer", el, extend)
	}

	// A slot while an extend is busy and nothing is queued: the heartbeat
	// is a batch of cover alone, once the extend is done.
	deadline := time.Now().Add(20 * extend)
	for m.Status().Stats.Records < 5 { // genesis, Init, Startup, two extends
		if time.Now().After(deadline) {
			t.Fatalf("the events were not extended: %+v", m.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	hb, _ := m.CoverStats()
	if err := j.Append(ctx, ext(3)); err != nil { // its batch: another 400 ms
		t.Fatal(err)
	}
	m.TriggerSlot()
	for n := hb; n == hb; n, _ = m.CoverStats() {
		if time.Now().After(deadline) {
			t.Fatal("a slot that came while an extend was busy never made its heartbeat")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHeartbeatGathersAnchored: a slot that comes while an anchored
// guest's extend runs waits for the guest's next event, which the extend
// answers, and carries it: the guest does not wait for a batch of cover
// alone and then for its own. With slots every 15 ms and extends of 3 ms,
// almost no heartbeat of the run is cover alone.
func TestHeartbeatGathersAnchored(t *testing.T) {
	ctx := context.Background()
	const interval = 15 * time.Millisecond
	m := slowMux(t, mux.Config{Cover: mux.Cover{Pad: 4, Interval: interval}}, 3*time.Millisecond)
	j := m.Journal(vtpmVM(t, m, "vm-1"), true)
	hb0, _ := m.CoverStats()
	start := time.Now()
	for k := range 150 {
		if err := j.Append(ctx, ext(byte(k))); err != nil {
			t.Fatal(err)
		}
		// The guest's way back through QEMU and its next measurement.
		for t0 := time.Now(); time.Since(t0) < 100*time.Microsecond; {
			runtime.Gosched()
		}
	}
	slots := int(time.Since(start) / interval)
	hb1, _ := m.CoverStats()
	alone := int(hb1 - hb0)
	t.Logf("%d slots during 150 anchored events: %d heartbeats of cover alone", slots, alone)
	if slots < 8 {
		t.Skipf("only %d slots passed: too few to tell", slots)
	}
	if alone > slots/2 { // a loaded machine may pause the guest past the gather
		t.Errorf("%d of %d slots made a batch of cover alone while the anchored guest was answered: its next event waited for it", alone, slots)
	}
}
