package libvirt

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/qemu"
)

// needLibvirtd skips unless TPMMUX_LIBVIRT_TESTS=1 and libvirtd answers on
// DefaultSocket (start it with scripts/libvirtd.sh start). With CI=true a
// libvirtd that does not answer fails the test.
func needLibvirtd(t *testing.T) *Client {
	t.Helper()
	if os.Getenv("TPMMUX_LIBVIRT_TESTS") != "1" {
		t.Skip("set TPMMUX_LIBVIRT_TESTS=1 (and run scripts/libvirtd.sh start) for the tests against a real libvirtd")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Connect(ctx, "")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("libvirtd does not answer (CI=true): %v", err)
		}
		t.Skipf("libvirtd does not answer on %s (scripts/libvirtd.sh start): %v", DefaultSocket, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// testDomain is a transient, diskless, kernel-less domain under TCG: it
// idles in SeaBIOS ("No bootable device", and a reset every 60 s).
func testDomain(t *testing.T) (name string, uuid [16]byte, xml string) {
	t.Helper()
	if _, err := rand.Read(uuid[:]); err != nil {
		t.Fatal(err)
	}
	uuid[6] = uuid[6]&0x0f | 0x40
	uuid[8] = uuid[8]&0x3f | 0x80
	name = fmt.Sprintf("tpmmux-test-%x", uuid[:4])
	xml = fmt.Sprintf(`<domain type='qemu'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_reboot>restart</on_reboot>
  <devices/>
</domain>`, name, conceal.FormatUUID(uuid))
	return name, uuid, xml
}

// createDomain starts xml as a transient domain, destroyed at the end of
// the test if still running.
func createDomain(t *testing.T, c *Client, xml string) golibvirt.Domain {
	t.Helper()
	d, err := c.Libvirt().DomainCreateXML(xml, 0)
	if err != nil {
		t.Fatalf("create domain: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Libvirt().DomainDestroy(d); err != nil && !golibvirt.IsNotFound(err) {
			t.Logf("cleanup: destroy %s: %v", d.Name, err)
		}
	})
	return d
}

// waitEvent reads evs until an event of kind (and detail, if not empty)
// for the domain uuid arrives.
func waitEvent(t *testing.T, evs <-chan Event, uuid [16]byte, kind EventKind, detail string) Event {
	t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case ev, ok := <-evs:
			if !ok {
				t.Fatalf("event stream closed while waiting for %s", kind)
			}
			if ev.UUID != uuid {
				continue
			}
			t.Logf("event %s %s %s", ev.Name, ev.Kind, ev.Detail)
			if ev.Kind == kind && (detail == "" || ev.Detail == detail) {
				return ev
			}
		case <-timeout:
			t.Fatalf("no %s %s event within 60s", kind, detail)
		}
	}
}

// TestLibvirtLifecycle drives a real domain through start, reset, pause
// (QMP through libvirt) and destroy, and checks the listing, reconcile and
// events.
func TestLibvirtLifecycle(t *testing.T) {
	c := needLibvirtd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	evs, err := c.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	name, uuid, xml := testDomain(t)
	d := createDomain(t, c, xml)
	started := waitEvent(t, evs, uuid, EventStarted, "booted")
	if started.Name != name || started.ID != d.ID || started.ID <= 0 {
		t.Fatalf("started event %+v, domain %+v", started, d)
	}

	running, err := c.RunningDomains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var mine *DomainInfo
	for i := range running {
		if running[i].UUID == uuid {
			mine = &running[i]
		}
	}
	if mine == nil || mine.Name != name || mine.ID != d.ID {
		t.Fatalf("domain %s not among running %+v", name, running)
	}
	parsed, err := mine.Parse()
	if err != nil || parsed.Name != name || parsed.UUID != uuid {
		t.Fatalf("parse live XML: %+v, %v", parsed, err)
	}

	live := KnownVM{ID: conceal.Digest{1}, Name: name, UUID: uuid}
	gone := KnownVM{ID: conceal.Digest{2}, Name: "tpmmux-test-gone", UUID: [16]byte{1}}
	plan, err := c.Plan(ctx, func() ([]KnownVM, error) { return []KnownVM{live, gone}, nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Matched) != 1 || plan.Matched[0].VM != live || len(plan.Teardown) != 1 || plan.Teardown[0] != gone {
		t.Fatalf("plan %+v", plan)
	}
	for _, u := range plan.Unknown {
		if u.UUID == uuid {
			t.Fatalf("own domain reported unknown: %+v", plan)
		}
	}

	// Reset: libvirt's reboot event.
	if err := c.Libvirt().DomainReset(d, 0); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, evs, uuid, EventReset, "")

	// Pause through QMP via libvirt: libvirt sees QEMU's STOP.
	mon, err := qemu.NewLibvirtMonitor(ctx, c.Libvirt(), uuid)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := qemu.Status(ctx, mon); err != nil || !st.Running || st.Status != "running" {
		t.Fatalf("status before pause: %+v, %v", st, err)
	}
	if err := qemu.CheckCID(ctx, mon, 0); err != nil {
		t.Fatalf("CheckCID on a domain without vsock: %v", err)
	}
	if _, err := qemu.VsockCID(ctx, mon); !errors.Is(err, qemu.ErrNoVsock) {
		t.Fatalf("VsockCID: %v, want ErrNoVsock", err)
	}
	if err := qemu.Pause(ctx, mon); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, evs, uuid, EventSuspended, "paused")
	if st, err := qemu.Status(ctx, mon); err != nil || st.Running || st.Status != "paused" {
		t.Fatalf("status after pause: %+v, %v", st, err)
	}
	state, _, err := c.Libvirt().DomainGetState(d, 0)
	if err != nil || golibvirt.DomainState(state) != golibvirt.DomainPaused {
		t.Fatalf("libvirt state %d, %v; want paused", state, err)
	}

	if err := c.Libvirt().DomainDestroy(d); err != nil {
		t.Fatal(err)
	}
	if stopped := waitEvent(t, evs, uuid, EventStopped, "destroyed"); stopped.ID != -1 {
		t.Errorf("stopped event has domain id %d, want -1", stopped.ID)
	}
	if _, err := qemu.Status(ctx, mon); !errors.Is(err, qemu.ErrInstanceChanged) {
		t.Fatalf("status after destroy: %v, want ErrInstanceChanged", err)
	}
	running, err = c.RunningDomains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p := Reconcile(running, []KnownVM{live}); len(p.Teardown) != 1 || p.Teardown[0] != live {
		t.Fatalf("after destroy: plan %+v", p)
	}

	cancel()
	for range evs { // the stream closes once ctx ends
	}
}

// proxy forwards unix connections to libvirtd's socket; cut drops them all,
// which the client sees as libvirtd going away.
type proxy struct {
	path  string
	mu    sync.Mutex
	conns []net.Conn
	n     int
}

func startProxy(t *testing.T, target string) *proxy {
	t.Helper()
	dir, err := os.MkdirTemp("", "tpmmux-lv")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{path: filepath.Join(dir, "sock")}
	ln, err := net.Listen("unix", p.path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		p.cut()
		wg.Wait()
		os.RemoveAll(dir)
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("unix", target)
			if err != nil {
				in.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, in, out)
			p.n++
			p.mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(out, in); out.Close() }()
			go func() { defer wg.Done(); io.Copy(in, out); in.Close() }()
		}
	}()
	return p
}

func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *proxy) accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// TestWatcherReconnects runs Follow through a proxy that drops the
// connection as a libvirtd restart would: the watcher reconnects,
// reconciles again, and records resets before and after.
func TestWatcherReconnects(t *testing.T) {
	c := needLibvirtd(t)
	px := startProxy(t, DefaultSocket)
	name, uuid, xml := testDomain(t)
	vmA := KnownVM{ID: conceal.Digest{1}, Name: name, UUID: uuid}
	gone := KnownVM{ID: conceal.Digest{2}, Name: "tpmmux-test-gone", UUID: [16]byte{2}}
	h := &fakeHost{live: []KnownVM{vmA, gone}, resets: make(chan KnownVM, 16), torn: make(chan KnownVM, 16)}
	var hostMu sync.Mutex
	locked := &lockedHost{h: h, mu: &hostMu}

	d := createDomain(t, c, xml) // before the watcher: vmA's domain runs
	checked := make(chan error, 4)
	w := Follow(px.path, checkingHost{locked, checked}, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	w.MinBackoff, w.MaxBackoff = 50*time.Millisecond, 200*time.Millisecond
	connected := make(chan struct{}, 16)
	reconcile := w.Connected
	w.Connected = func(ctx context.Context, c *Client) error {
		err := reconcile(ctx, c)
		connected <- struct{}{}
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()

	wait := func(what string, ch <-chan struct{}) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(60 * time.Second):
			t.Fatalf("timed out waiting for %s", what)
		}
	}
	wait("first connection", connected)
	select {
	case v := <-h.torn:
		if v != gone {
			t.Fatalf("tore down %+v, want %+v", v, gone)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("missed stop not torn down")
	}

	waitReset := func() {
		t.Helper()
		if err := c.Libvirt().DomainReset(d, 0); err != nil {
			t.Fatal(err)
		}
		select {
		case v := <-h.resets:
			if v != vmA {
				t.Fatalf("reset recorded for %+v", v)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("reset not recorded")
		}
	}
	waitReset()

	px.cut() // as if libvirtd restarted
	wait("reconnection", connected)
	if px.accepted() < 2 {
		t.Fatalf("proxy accepted %d connections", px.accepted())
	}
	if w.Client() == nil {
		t.Fatal("no client after reconnecting")
	}
	time.Sleep(time.Second) // SeaBIOS resets once more after a reset: let that pass
	for len(h.resets) > 0 {
		<-h.resets
	}
	waitReset()
	select {
	case v := <-h.torn:
		t.Fatalf("second reconcile tore down %+v", v)
	default:
	}

	// A VM started now (its identity made first, as by the prepare hook)
	// is checked over QMP from the started event.
	_, uuidB, xmlB := testDomain(t)
	nameB := fmt.Sprintf("tpmmux-test-%x", uuidB[:4])
	locked.add(KnownVM{ID: conceal.Digest{3}, Name: nameB, UUID: uuidB})
	createDomain(t, c, xmlB)
	select {
	case err := <-checked:
		if err != nil {
			t.Fatalf("CID check of the started VM: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("started VM not checked")
	}

	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
}

// lockedHost serializes a fakeHost (Follow calls it from the watcher
// goroutine, the test reads it).
type lockedHost struct {
	h  *fakeHost
	mu *sync.Mutex
}

func (l *lockedHost) LiveVMs() ([]KnownVM, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h.LiveVMs()
}

func (l *lockedHost) Teardown(ctx context.Context, v KnownVM, reason string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.h.Teardown(ctx, v, reason)
}

func (l *lockedHost) Reset(ctx context.Context, v KnownVM) error { return l.h.Reset(ctx, v) }

func (l *lockedHost) add(v KnownVM) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.h.live = append(l.h.live, v)
}

// checkingHost checks the vsock CID of every started VM over QMP through
// libvirt, as the bridge should.
type checkingHost struct {
	*lockedHost
	checked chan error
}

func (h checkingHost) Started(ctx context.Context, vm KnownVM, c *Client) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	mon, err := qemu.NewLibvirtMonitor(ctx, c.Libvirt(), vm.UUID)
	if err == nil {
		err = qemu.CheckCID(ctx, mon, 0) // the test domains have no <vsock>
	}
	h.checked <- err
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}
