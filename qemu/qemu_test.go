package qemu

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/record"
)

// TestSocketPauseStatus pauses a real QEMU through its QMP socket.
func TestSocketPauseStatus(t *testing.T) {
	sock := startQEMU(t)
	mon := dial(t, sock)
	if mon.Version() == "" {
		t.Error("no QEMU version in the greeting")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	steps := []struct {
		name    string
		do      func() error
		running bool
		status  string
	}{
		{"fresh", func() error { return nil }, true, "running"},
		{"pause", func() error { return Pause(ctx, mon) }, false, "paused"},
		{"pause again", func() error { return Pause(ctx, mon) }, false, "paused"},
		{"cont", func() error { return Execute(ctx, mon, "cont", nil, nil) }, true, "running"},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		st, err := Status(ctx, mon)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if st.Running != s.running || st.Status != s.status {
			t.Fatalf("%s: status %+v, want running=%v status=%q", s.name, st, s.running, s.status)
		}
	}
	err := Execute(ctx, mon, "no-such-command", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "no-such-command") {
		t.Fatalf("unknown command: err %v", err)
	}
}

// TestQOMWalkRealQEMU runs the device search that VsockCID uses against a
// real QEMU. This host has no /dev/vhost-vsock, so a vhost-vsock device
// cannot be created: virtio-rng-pci stands in, its "period" read the
// way guest-cid is. With TPMMUX_QMP_RECORD=1 the exchanges are saved
// as testdata/qemu-7.2-rng.json for the replay tests.
func TestQOMWalkRealQEMU(t *testing.T) {
	sock := startQEMU(t, "-device", "virtio-rng-pci,id=rng0,period=4242", "-device", "virtio-rng-pci,period=77")
	rec := &recorder{Monitor: dial(t, sock)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	devs, err := FindDevices(ctx, rec, "virtio-rng-pci")
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		dev    Device
		period uint64
	}{
		{Device{Path: "/machine/peripheral/rng0", Type: "virtio-rng-pci"}, 4242},
		{Device{Path: "/machine/peripheral-anon/device[0]", Type: "virtio-rng-pci"}, 77},
	}
	if len(devs) != len(want) {
		t.Fatalf("found %+v, want %d devices", devs, len(want))
	}
	for i, w := range want {
		if devs[i] != w.dev {
			t.Errorf("device %d: %+v, want %+v", i, devs[i], w.dev)
		}
		p, err := QOMUint(ctx, rec, devs[i].Path, "period")
		if err != nil {
			t.Fatal(err)
		}
		if p != w.period {
			t.Errorf("%s period %d, want %d", devs[i].Path, p, w.period)
		}
	}
	if _, err := QOMUint(ctx, rec, "/machine/peripheral/rng0", "no-such-prop"); err == nil {
		t.Error("reading a missing property succeeded")
	}
	if _, err := VsockCID(ctx, rec); !errors.Is(err, ErrNoVsock) {
		t.Fatalf("VsockCID without a vsock device: %v, want ErrNoVsock", err)
	}
	// The property name VsockCID reads, as this QEMU defines it.
	var props []QOMProperty
	if err := Execute(ctx, rec, "qom-list-properties", map[string]string{"typename": "vhost-vsock-pci"}, &props); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range props {
		if p.Name == GuestCIDProperty {
			found = p.Type == "uint64"
		}
	}
	if !found {
		t.Fatalf("vhost-vsock-pci has no uint64 %s property: %+v", GuestCIDProperty, props)
	}
	rec.save(t, "testdata/qemu-7.2-rng.json", "recorded from QEMU "+rec.Monitor.(*SocketMonitor).Version()+
		" (-machine pc,accel=tcg -nodefaults -device virtio-rng-pci,id=rng0,period=4242 -device virtio-rng-pci,period=77) by TestQOMWalkRealQEMU with TPMMUX_QMP_RECORD=1")
}

// TestDialBusySocket: QEMU serves one QMP client at a time, so a second
// client gets no greeting; DialSocket must give up when ctx ends.
func TestDialBusySocket(t *testing.T) {
	tests := []struct {
		name string
		sock func(t *testing.T) string
	}{
		{"real QEMU held by another client", func(t *testing.T) string {
			s := startQEMU(t)
			dial(t, s)
			return s
		}},
		{"server that never greets", func(t *testing.T) string { return fakeQMP(t, false) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := tt.sock(t)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			_, err := DialSocket(ctx, sock)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err %v, want deadline exceeded", err)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %v", d)
			}
		})
	}
}

// TestRunCancelHungQEMU: a command QEMU never answers ends with ctx and
// closes the monitor.
func TestRunCancelHungQEMU(t *testing.T) {
	mon := dial(t, fakeQMP(t, true))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := Status(ctx, mon); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want deadline exceeded", err)
	}
	if _, err := Status(context.Background(), mon); err == nil {
		t.Fatal("monitor still usable after a cancelled command")
	}
}

func TestPauseRecord(t *testing.T) {
	now := time.Unix(1700000000, 5)
	r := PauseRecord(now, "policy: unknown executable")
	if err := r.Validate(); err != nil {
		t.Fatal(err)
	}
	if r.Kind != record.KindAction || r.Action.Action != "pause" || r.Time != now.UnixNano() || r.Action.Detail != "policy: unknown executable" {
		t.Fatalf("record %+v %+v", r, r.Action)
	}
}
