package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
	"github.com/tpmmux/tpmmux/internal/wire/wiretest"
	"github.com/tpmmux/tpmmux/libvirt"
)

// verifyEvidence checks an evidence answer the way a tenant would and
// returns how many measurements it holds.
func verifyEvidence(t *testing.T, ev *control.Evidence, nonce []byte) int {
	t.Helper()
	e, err := evidence.Decode(ev.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(ev.AKPEM))
	if blk == nil {
		t.Fatal("no AK PEM")
	}
	ak, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	opts := verify.Options{Identity: &ev.Identity, AK: ak.(*ecdsa.PublicKey), PCR: 13}
	if ev.PostMortem {
		opts.PostMortem = true
	} else {
		opts.Nonce = nonce
	}
	rep, err := verify.Verify(e, opts)
	if err != nil {
		t.Fatalf("evidence rejected: %v", err)
	}
	return rep.Counts.Measurements
}

func metricValue(t *testing.T, text, name string) float64 {
	t.Helper()
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+]+)$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("metric %s missing", name)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

func vmRow(t *testing.T, e *env, name string, all bool) *control.VM {
	t.Helper()
	resp := e.mustCall(&control.Request{Op: control.OpVMs, All: all})
	for i := range resp.VMs {
		if resp.VMs[i].Name == name {
			return &resp.VMs[i]
		}
	}
	return nil
}

// The whole lifecycle over the control socket: prepare opens the VM's
// listeners, a guest streams a real IMA list over virtio-serial, its
// evidence verifies, stopped closes the listeners, release records the
// teardown once with libvirt's reason.
func TestLifecycle(t *testing.T) {
	e := newEnv(t)
	e.start()
	xml := e.domainXML("vm-a", "")
	resp := e.mustCall(&control.Request{Op: control.OpPrepare, XML: xml})
	vm := resp.VM
	if vm == nil || vm.Name != "vm-a" || vm.Skipped || vm.Records != 1 {
		t.Fatalf("prepare answered %+v", vm)
	}
	kinds := map[string]string{}
	for _, l := range vm.Listeners {
		kinds[l.Kind] = l.Addr
	}
	if kinds["virtio-serial"] != e.serialPath("vm-a") || kinds["unix"] == "" || len(kinds) != 2 {
		t.Fatalf("listeners %+v", vm.Listeners)
	}
	fi, err := os.Stat(e.serialPath("vm-a"))
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("serial socket: %v %v", fi, err)
	}
	// started begin with the live XML.
	if r := e.mustCall(&control.Request{Op: control.OpStarted, Name: "vm-a", XML: xml}); r.VM == nil || r.VM.CID != 42 {
		t.Fatalf("started answered %+v", r.VM)
	}

	es := wiretest.Entries(t, "../ima/testdata/guest-imasig-sha256.bin")
	g := wiretest.DialUnix(t, e.serialPath("vm-a"), true)
	go g.Conn.Write([]byte("stale bytes before the agent starts\x00\x01"))
	if w := g.Hello("boot-1"); w.VM != "vm-a" || w.Resume != 0 {
		t.Fatalf("welcome %+v", w)
	}
	g.Stream(es, 0, len(es))

	m := e.metrics()
	if got := metricValue(t, m, "tpmmux_ingest_records_total"); got < float64(len(es)+1) {
		t.Fatalf("ingest records %v, want ≥ %d", got, len(es)+1)
	}
	if metricValue(t, m, `tpmmux_vm_records{vm="vm-a"}`) != float64(len(es)+1) ||
		metricValue(t, m, "tpmmux_live_sessions") != 1 || metricValue(t, m, "tpmmux_batches_total") < 1 ||
		metricValue(t, m, "tpmmux_batch_size_records_count") < 1 || metricValue(t, m, "tpmmux_extend_duration_seconds_count") < 1 {
		t.Fatalf("metrics after ingest:\n%s", m)
	}

	nonce := []byte("verifier nonce 1")
	ev := e.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-a", Nonce: nonce}).Evidence
	if n := verifyEvidence(t, ev, nonce); n != len(es) {
		t.Fatalf("%d measurements verified, want %d", n, len(es))
	}
	if metricValue(t, e.metrics(), "tpmmux_quote_duration_seconds_count") < 1 {
		t.Fatal("no quote latency observed")
	}

	// stopped end: QEMU is gone; libvirt restores the socket's label and
	// then runs release end with the shutoff reason: the listeners close
	// and the teardown is recorded then.
	e.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-a", Reason: "-"})
	if row := vmRow(t, e, "vm-a", false); row == nil || !row.Live {
		t.Fatal("torn down before release end")
	}
	e.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-a", Reason: "destroyed"})
	if _, err := os.Stat(e.serialPath("vm-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("serial socket still there: %v", err)
	}
	if _, err := net.Dial("unix", kinds["unix"]); err == nil {
		t.Fatal("dev unix socket still accepts")
	}
	g.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := g.C.Recv(); err == nil {
		t.Fatal("guest session survived the teardown")
	}
	e.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-a", Reason: "destroyed"})
	e.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-a", Reason: "-"})
	time.Sleep(2 * time.Duration(e.cfg.StopGrace))
	row := vmRow(t, e, "vm-a", true)
	if row == nil || row.Live || row.EndedBy != "destroyed" || row.Records != uint64(len(es)+2) {
		t.Fatalf("after teardown: %+v (want ended by destroyed with %d records: one teardown)", row, len(es)+2)
	}
	if vmRow(t, e, "vm-a", false) != nil {
		t.Fatal("ended VM listed as live")
	}
	// Post-mortem evidence of the ended VM.
	pm := e.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-a", Nonce: nonce}).Evidence
	if !pm.PostMortem || verifyEvidence(t, pm, nil) != len(es) {
		t.Fatal("post-mortem evidence")
	}
	if _, err := os.Stat(filepath.Join(e.cfg.StateDir, "vms")); err == nil {
		if ents, _ := os.ReadDir(filepath.Join(e.cfg.StateDir, "vms")); len(ents) != 0 {
			t.Fatalf("listener state left behind: %v", ents)
		}
	}
	st := e.mustCall(&control.Request{Op: control.OpStatus}).Status
	if st.LiveVMs != 0 || st.Listeners != 0 || st.Fault != "" || st.Epoch != 1 {
		t.Fatalf("status %+v", st)
	}
}

// A bridge restart while a VM runs: the restarted bridge opens the VM's
// serial socket again (with the owner libvirt gave it) and the guest
// resumes where the durable log ends.
func TestRestartResumes(t *testing.T) {
	e := newEnv(t)
	e.start()
	xml := e.domainXML("vm-r", "")
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: xml})
	// libvirt's DAC driver labels the socket for QEMU's user at start.
	if err := os.Chown(e.serialPath("vm-r"), 65534, 65534); err != nil {
		t.Fatal(err)
	}
	e.mustCall(&control.Request{Op: control.OpStarted, Name: "vm-r", XML: xml})
	es := wiretest.Entries(t, "../ima/testdata/guest-imasig-sha256.bin")
	half := len(es) / 2
	g := wiretest.DialUnix(t, e.serialPath("vm-r"), true)
	g.Hello("boot-1")
	g.Stream(es, 0, half)
	e.stop()
	if _, err := os.Stat(e.serialPath("vm-r")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("serial socket outlived the bridge: %v", err)
	}

	e.start()
	fi, err := os.Stat(e.serialPath("vm-r"))
	if err != nil {
		t.Fatalf("serial socket not reopened: %v", err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 || st.Gid != 65534 {
		t.Fatalf("reopened socket owned by %d:%d, want libvirt's 65534:65534", st.Uid, st.Gid)
	}
	row := vmRow(t, e, "vm-r", false)
	if row == nil || len(row.Listeners) != 2 {
		t.Fatalf("after restart: %+v", row)
	}
	if !e.log.contains("live VM re-adopted") {
		t.Fatal("no re-adoption logged")
	}
	// QEMU reconnects (<reconnect enabled='yes'>) and the agent resumes.
	g = wiretest.DialUnix(t, e.serialPath("vm-r"), true)
	if w := g.Hello("boot-1"); w.Resume != uint64(half) {
		t.Fatalf("resume at %d, want %d", w.Resume, half)
	}
	g.Stream(es, half, len(es))
	nonce := []byte("after restart of the bridge")
	ev := e.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-r", Nonce: nonce}).Evidence
	if n := verifyEvidence(t, ev, nonce); n != len(es) {
		t.Fatalf("%d measurements after restart, want %d (none lost or doubled)", n, len(es))
	}
}

// libvirtd restarted while the bridge had lost the VM's listener state:
// reconnect reopens the serial socket from the live XML.
func TestReconnectReopensFromXML(t *testing.T) {
	e := newEnv(t)
	e.start()
	xml := e.domainXML("vm-c", "")
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: xml})
	e.stop()
	os.RemoveAll(filepath.Join(e.cfg.StateDir, "vms"))
	e.start()
	row := vmRow(t, e, "vm-c", false)
	if row == nil || len(row.Listeners) != 1 || row.Listeners[0].Kind != "unix" {
		t.Fatalf("without state only the dev socket reopens: %+v", row)
	}
	vm := e.mustCall(&control.Request{Op: control.OpReconnect, XML: xml}).VM
	if len(vm.Listeners) != 2 {
		t.Fatalf("after reconnect: %+v", vm.Listeners)
	}
	g := wiretest.DialUnix(t, e.serialPath("vm-c"), true)
	if w := g.Hello("b"); w.VM != "vm-c" {
		t.Fatalf("welcome %+v", w)
	}
	// A reconnect for a domain of the same name but another uuid is refused.
	other := e.domainXML("vm-c", "11111111-2222-3333-4444-555555555555")
	if _, err := e.call(&control.Request{Op: control.OpReconnect, XML: other}); err == nil || !strings.Contains(err.Error(), "belongs to domain uuid") {
		t.Fatalf("reconnect of another domain: %v", err)
	}
	// A domain without a live identity.
	if _, err := e.call(&control.Request{Op: control.OpReconnect, XML: e.domainXML("vm-none", "")}); err == nil || !strings.Contains(err.Error(), "no live identity") {
		t.Fatalf("reconnect of an unknown domain: %v", err)
	}
}

// "stopped end" alone: the teardown follows after stop_grace with reason
// "stopped"; a shutdown in between records it at once.
func TestStoppedWithoutRelease(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-s1", "")})
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-s2", "")})
	e.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-s1", Reason: "-"})
	if row := vmRow(t, e, "vm-s1", true); row == nil || !row.Live {
		t.Fatalf("teardown before the grace: %+v", row)
	}
	time.Sleep(3 * time.Duration(e.cfg.StopGrace))
	if row := vmRow(t, e, "vm-s1", true); row == nil || row.Live || row.EndedBy != "stopped" {
		t.Fatalf("after the grace: %+v", row)
	}
	if _, err := os.Stat(e.serialPath("vm-s1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("listeners open after the grace")
	}
	e.cfg.StopGrace = Duration(time.Hour)
	e.stop()
	e.start()
	e.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-s2", Reason: "-"})
	e.stop()
	e.start()
	if row := vmRow(t, e, "vm-s2", true); row == nil || row.Live || row.EndedBy != "stopped" {
		t.Fatalf("pending teardown not recorded at shutdown: %+v", row)
	}
	// A new start of a stopped domain ends the pending teardown first.
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-s3", "")})
	e.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-s3", Reason: "-"})
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-s3", "")})
	resp := e.mustCall(&control.Request{Op: control.OpVMs, All: true})
	var live, stopped int
	for _, v := range resp.VMs {
		if v.Name == "vm-s3" && v.Live {
			live++
		}
		if v.Name == "vm-s3" && v.EndedBy == "stopped" {
			stopped++
		}
	}
	if live != 1 || stopped != 1 {
		t.Fatalf("vm-s3 instances: %+v", resp.VMs)
	}
}

func TestPrepareRefusalsAndOptOut(t *testing.T) {
	e := newEnv(t)
	e.start()
	outside := strings.ReplaceAll(e.domainXML("vm-x", ""), e.serialPath("vm-x"), "/etc/evil.sock")
	if _, err := e.call(&control.Request{Op: control.OpPrepare, XML: outside}); err == nil || !strings.Contains(err.Error(), "not in the bridge's serial directory") {
		t.Fatalf("serial socket outside the serial dir: %v", err)
	}
	dotdot := strings.ReplaceAll(e.domainXML("vm-x", ""), e.serialPath("vm-x"), e.cfg.SerialDir+"/../control.sock")
	if _, err := e.call(&control.Request{Op: control.OpPrepare, XML: dotdot}); err == nil {
		t.Fatal("serial socket path with .. accepted")
	}
	bind := strings.ReplaceAll(e.domainXML("vm-x", ""), "mode='connect'", "mode='bind'")
	if _, err := e.call(&control.Request{Op: control.OpPrepare, XML: bind}); err == nil || !strings.Contains(err.Error(), "mode='connect'") {
		t.Fatalf("mode=bind: %v", err)
	}
	if _, err := e.call(&control.Request{Op: control.OpPrepare, XML: "<domain>"}); err == nil {
		t.Fatal("bad XML accepted")
	}
	if _, err := os.Stat("/etc/evil.sock"); err == nil {
		t.Fatal("a socket was created outside the serial dir")
	}
	if st := e.mustCall(&control.Request{Op: control.OpStatus}).Status; st.LiveVMs != 0 || st.Records != 0 {
		t.Fatalf("a refused prepare left an identity: %+v", st)
	}
	// Two domains cannot share one serial socket.
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-1", "")})
	clash := strings.ReplaceAll(e.domainXML("vm-2", "22222222-2222-3333-4444-555555555555"), e.serialPath("vm-2"), e.serialPath("vm-1"))
	if _, err := e.call(&control.Request{Op: control.OpPrepare, XML: clash}); err == nil || !strings.Contains(err.Error(), "already used by vm vm-1") {
		t.Fatalf("shared serial socket: %v", err)
	}
	// Opted out by metadata.
	out := strings.ReplaceAll(e.domainXML("vm-o", ""), `enabled="yes"`, `enabled="no"`)
	if vm := e.mustCall(&control.Request{Op: control.OpPrepare, XML: out}).VM; !vm.Skipped {
		t.Fatalf("opted-out domain got %+v", vm)
	}
	if _, err := os.Stat(e.serialPath("vm-o")); err == nil {
		t.Fatal("opted-out domain got a listener")
	}
	// On an opt-in host a domain without metadata is skipped.
	e.stop()
	e.cfg.Hook.Mode = ModeOptIn
	e.start()
	none := regexp.MustCompile(`(?s)<metadata>.*</metadata>`).ReplaceAllString(e.domainXML("vm-n", ""), "")
	if vm := e.mustCall(&control.Request{Op: control.OpPrepare, XML: none}).VM; !vm.Skipped {
		t.Fatalf("opt-in host attested %+v", vm)
	}
	if vm := e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-y", "")}).VM; vm.Skipped {
		t.Fatal("opted-in domain skipped")
	}
}

// On virtio-serial the stream outlives a guest session: after a session
// ends with a protocol error the next agent says hello on the same stream.
func TestSerialStreamOutlivesSession(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-p", "")})
	es := wiretest.Entries(t, "../ima/testdata/guest-imasig-sha256.bin")
	g := wiretest.DialUnix(t, e.serialPath("vm-p"), true)
	g.Hello("boot-1")
	g.Stream(es, 0, 10)
	// A gap is fatal for the session ...
	g.C.Send(wire.TypeMeasurements, &wire.Measurements{Seq: 99, First: 300, Entries: es[300:301]})
	f, err := g.C.Recv()
	if err != nil || f.Type != wire.TypeError {
		t.Fatalf("want an error frame, got %v %v", f.Type, err)
	}
	// ... not for the stream.
	time.Sleep(300 * time.Millisecond)
	if w := g.Hello("boot-1"); w.Resume != 10 {
		t.Fatalf("resume %d on the same stream, want 10", w.Resume)
	}
	g.Stream(es, 10, 20)
	// A session on another transport replaces the serial one; the serial
	// stream then serves the next hello again.
	u := wiretest.DialUnix(t, filepath.Join(e.cfg.GuestUnixDir, "vm-p.sock"), false)
	if w := u.Hello("boot-1"); w.Resume != 20 {
		t.Fatalf("unix session resume %d", w.Resume)
	}
	u.Conn.Close()
	time.Sleep(300 * time.Millisecond)
	if w := g.Hello("boot-1"); w.Resume != 20 {
		t.Fatalf("serial resume %d", w.Resume)
	}
}

// A guest cannot hold more than maxConnsPerVM connections.
func TestConnectionLimit(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-l", "")})
	path := filepath.Join(e.cfg.GuestUnixDir, "vm-l.sock")
	var conns []net.Conn
	for i := 0; i < maxConnsPerVM+3; i++ {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		defer c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.d.dropped.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := metricValue(t, e.metrics(), "tpmmux_dropped_connections_total"); got != 3 {
		t.Fatalf("dropped %v, want 3", got)
	}
	if got := metricValue(t, e.metrics(), "tpmmux_live_sessions"); got != maxConnsPerVM {
		t.Fatalf("sessions %v, want %d", got, maxConnsPerVM)
	}
}

// The daemon is a libvirt.Host: reconciliation can list, tear down (by
// instance id) and record resets.
func TestLibvirtHost(t *testing.T) {
	e := newEnv(t)
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-h", "")})
	var h libvirt.Host = e.d.LibvirtHost()
	live, err := h.LiveVMs()
	if err != nil || len(live) != 1 || live[0].Name != "vm-h" {
		t.Fatalf("live %+v %v", live, err)
	}
	ctx := context.Background()
	if err := h.Reset(ctx, live[0]); err != nil {
		t.Fatal(err)
	}
	if err := h.Teardown(ctx, live[0], libvirt.ReasonMissedStop); err != nil {
		t.Fatal(err)
	}
	if err := h.Teardown(ctx, live[0], libvirt.ReasonMissedStop); err != nil {
		t.Fatalf("second teardown: %v", err)
	}
	row := vmRow(t, e, "vm-h", true)
	if row.Live || row.EndedBy != libvirt.ReasonMissedStop || row.Records != 3 {
		t.Fatalf("after reconcile teardown: %+v", row)
	}
	if _, err := os.Stat(e.serialPath("vm-h")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("listener left open")
	}
}

func TestNoTPMDevice(t *testing.T) {
	cfg := DefaultConfig()
	cfg.TPM = "device:/nonexistent/tpmrm0"
	_, err := Start(context.Background(), cfg, Options{})
	var nt *NoTPMError
	if !errors.As(err, &nt) {
		t.Fatalf("err = %v", err)
	}
	want := "no TPM at /nonexistent/tpmrm0 (use --tpm swtpm:HOST:PORT for a software TPM, or --tpm sim for the in-process simulator: testing only)"
	if err.Error() != want {
		t.Fatalf("err = %q", err)
	}
}
