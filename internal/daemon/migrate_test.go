package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/migrate"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire/wiretest"
	"github.com/tpmmux/tpmmux/libvirt"
)

// migHosts makes two bridges that trust each other for live migration:
// a on the simulator (ECC EK, a test vendor CA), b on a manufactured
// swtpm (RSA EK from swtpm_setup), each enrolled and pinned by the other.
func migHosts(t testing.TB) (a, b *env) {
	t.Helper()
	return migHostsWith(t, nil)
}

// migHostsWith is migHosts with each env's configuration adjusted by tune
// before the bridges start.
func migHostsWith(t testing.TB, tune func(*env)) (a, b *env) {
	t.Helper()
	ctx := t.Context()
	p, swCA := swtpmproc.ManufactureTest(t, "")
	a, b = newEnvTPM(t, "sim"), newEnvTPM(t, p.Spec())
	vendor, err := enrolltest.NewCA("vendor EK CA")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := enrolltest.Provision(ctx, a.tp, vendor); err != nil {
		t.Fatal(err)
	}
	bundle, err := swCA.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	cas := append(append([]byte{}, vendor.PEM...), bundle...)
	pool, _, err := enroll.ParseCAs(cas)
	if err != nil {
		t.Fatal(err)
	}
	type side struct {
		e    *env
		name string
		rec  string
		pin  string
		addr string
	}
	sides := []*side{{e: a, name: "hosta"}, {e: b, name: "hostb"}}
	for _, s := range sides {
		s.e.cfg.Host = s.name
		s.e.cfg.Migration.EKCA = filepath.Join(s.e.dir, "ek-ca.pem")
		if err := os.WriteFile(s.e.cfg.Migration.EKCA, cas, 0o644); err != nil {
			t.Fatal(err)
		}
		if s.rec, err = enroll.Save(filepath.Join(s.e.dir, "enrolled"), enrollTPM(t, s.e.tp, s.name, pool)); err != nil {
			t.Fatal(err)
		}
		if s.pin, err = s.e.cfg.Migration.CertSHA256(s.e.cfg.StateDir, s.name); err != nil {
			t.Fatal(err)
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s.addr = l.Addr().String()
		l.Close()
		s.e.cfg.Migration.Listen = s.addr
		s.e.cfg.Migration.HandoverTimeout = "20s"
	}
	for i, s := range sides {
		o := sides[1-i]
		s.e.cfg.Migration.Peers = []migrate.Peer{{Name: o.name, Address: o.addr, TLSSHA256: o.pin, Enrolled: o.rec}}
	}
	if tune != nil {
		tune(a)
		tune(b)
	}
	a.start()
	b.start()
	return a, b
}

func enrollTPM(t testing.TB, tp tpm.TPM, name string, pool *x509.CertPool) *enroll.Record {
	t.Helper()
	ctx := t.Context()
	en := tp.(tpm.Enroller)
	e, err := en.Enrollment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	req := &enroll.Request{Version: enroll.Version, Host: name, EKKind: string(e.Kind), EKCertIndex: fmt.Sprintf("0x%08x", e.CertIndex),
		EKCert: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})), EKPublic: e.EKPublic, AKPublic: e.AKPublic}
	chal, st, err := enroll.NewChallenge(req, pool, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	sec, err := en.ActivateCredential(ctx, tpm.EKKind(chal.EKKind), chal.CredentialBlob, chal.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := enroll.Finish(st, &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: sec}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// waitFor polls cond for up to 15 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// verifyChain verifies a VM's evidence against both hosts' AKs and
// returns the report.
func verifyChain(t *testing.T, ev *control.Evidence, nonce []byte, aks ...tpm.TPM) *verify.Report {
	t.Helper()
	e, err := evidence.Decode(ev.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	var keys []*ecdsa.PublicKey
	for _, tp := range aks {
		keys = append(keys, tp.AK())
	}
	rep, err := verify.Verify(e, verify.Options{Nonce: nonce, Identity: &ev.Identity, AKs: keys})
	if err != nil {
		t.Fatalf("evidence rejected: %v", err)
	}
	return rep
}

const migUUID = "0b5e1c7a-8d2f-4e61-9a3b-7c4d5e6f7081"

// The libvirt sequence of a live migration, through the control socket
// as the hook sends it: the destination's migrate begin, prepare and
// started of the incoming domain; the source's stopped and release with
// no reason (the stop is the migration's: the VM is reserved). The VM
// arrives with its identity, its guest resumes where it was, and its
// evidence on the destination verifies as one chain against both AKs.
func TestMigrationLifecycle(t *testing.T) {
	a, b := migHosts(t)
	xa, xb := a.domainXML("vm-m", migUUID), b.domainXML("vm-m", migUUID)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	a.mustCall(&control.Request{Op: control.OpStarted, Name: "vm-m", XML: xa})
	es := wiretest.Entries(t, "../ima/testdata/guest-imasig-sha256.bin")
	g := wiretest.DialUnix(t, a.serialPath("vm-m"), true)
	g.Hello("boot-1")
	g.Stream(es, 0, len(es))
	g.Conn.Close()
	nonce := []byte("verifier nonce 1")
	before := a.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-m", Nonce: nonce}).Evidence

	// Destination: migrate begin reserves at the source.
	r := b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-m", XML: xb})
	if r.VM == nil || !strings.Contains(r.VM.Note, "hosta") {
		t.Fatalf("migrate answered %+v", r.VM)
	}
	st := a.mustCall(&control.Request{Op: control.OpStatus}).Status
	if st.Migration == nil || st.Migration.Reserved != 1 || len(st.Migration.CertSHA256) != 64 {
		t.Fatalf("source status %+v", st.Migration)
	}
	// A second destination is refused: here the same one asking again
	// with a new handover (its nonce) is a second reservation.
	if _, err := b.call(&control.Request{Op: control.OpMigrate, Name: "vm-m", XML: xb}); err == nil || !strings.Contains(err.Error(), "fork") {
		t.Fatalf("second reservation: %v", err)
	}
	// prepare and started of the incoming domain: sockets, no identity.
	r = b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	if r.VM == nil || r.VM.Records != 0 || !strings.Contains(r.VM.Note, "incoming") {
		t.Fatalf("incoming prepare answered %+v", r.VM)
	}
	if _, err := os.Stat(b.serialPath("vm-m")); err != nil {
		t.Fatalf("no serial socket on the destination before QEMU starts: %v", err)
	}
	b.mustCall(&control.Request{Op: control.OpStarted, Name: "vm-m", XML: xb})
	if vmRow(t, b, "vm-m", true) != nil {
		t.Fatal("the destination has an identity before the handover")
	}
	// Source: QEMU stopped (migrated). Not a teardown: the handover.
	a.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-m", Reason: "-"})
	a.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-m", Reason: "-"})
	waitFor(t, "the VM live on the destination", func() bool { v := vmRow(t, b, "vm-m", false); return v != nil && v.Live })
	if v := vmRow(t, a, "vm-m", true); v == nil || v.Live || v.EndedBy != "migrated-out" {
		t.Fatalf("source row %+v", v)
	}
	// The guest reconnects on the destination and resumes where it was:
	// no entry lost, none doubled.
	g = wiretest.DialUnix(t, b.serialPath("vm-m"), true)
	if w := g.Hello("boot-1"); w.VM != "vm-m" || w.Resume != uint64(len(es)) {
		t.Fatalf("welcome on the destination %+v, want resume at %d", w, len(es))
	}
	g.Conn.Close()
	after := b.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-m", Nonce: nonce}).Evidence
	if after.Identity != before.Identity {
		t.Fatal("the VM's identity changed across the migration")
	}
	rep := verifyChain(t, after, nonce, a.tp, b.tp)
	if len(rep.Segments) != 2 || rep.Counts.Measurements != len(es) {
		t.Fatalf("report: %d segments, %d measurements", len(rep.Segments), rep.Counts.Measurements)
	}
	st = a.mustCall(&control.Request{Op: control.OpStatus}).Status
	if st.Migration.Reserved != 0 {
		t.Fatalf("reservation left on the source: %+v", st.Migration)
	}
}

// An aborted migration: the source VM resumes (libvirt's resumed event),
// the destination's incoming VM gets nothing and its sockets close; the
// source keeps its VM and history, and a later migration works. And the
// destination side of an abort: its incoming domain stops, which cancels
// the reservation at the source.
func TestMigrationAbort(t *testing.T) {
	a, b := migHosts(t)
	xa, xb := a.domainXML("vm-m", migUUID), b.domainXML("vm-m", migUUID)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-m", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	// domjobabort: the source resumes.
	host := a.d.LibvirtHost().(interface {
		Resumed(ctx context.Context, name string, uuid [16]byte, detail string)
	})
	host.Resumed(t.Context(), "vm-m", [16]byte{}, "migrated")
	waitFor(t, "the incoming VM dropped", func() bool {
		st := b.mustCall(&control.Request{Op: control.OpStatus}).Status
		return st.Migration.Incoming == 0 && b.d.incomingOf("vm-m") == nil
	})
	if _, err := os.Stat(b.serialPath("vm-m")); err == nil {
		t.Fatal("the incoming VM's socket is still there")
	}
	if vmRow(t, b, "vm-m", true) != nil {
		t.Fatal("half an identity on the destination")
	}
	if v := vmRow(t, a, "vm-m", false); v == nil || !v.Live {
		t.Fatal("the source lost its VM")
	}
	// Again; this time the destination's incoming domain fails.
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-m", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	b.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-m", Reason: "-"})
	b.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-m", Reason: "-"})
	waitFor(t, "the reservation cancelled", func() bool {
		return a.mustCall(&control.Request{Op: control.OpStatus}).Status.Migration.Reserved == 0
	})
	if v := vmRow(t, a, "vm-m", false); v == nil || !v.Live || vmRow(t, b, "vm-m", true) != nil {
		t.Fatal("after the destination's failure: source VM gone or destination identity")
	}
	// The source's stop now is a teardown, as before.
	a.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-m", Reason: "destroyed"})
	if v := vmRow(t, a, "vm-m", true); v == nil || v.Live || v.EndedBy != "destroyed" {
		t.Fatalf("source row after destroy %+v", v)
	}
}

// A bridge without a migration block refuses an incoming attested VM with
// the fix; one whose peers do not run the VM refuses it too.
func TestMigrateRefused(t *testing.T) {
	e := newEnv(t)
	e.start()
	_, err := e.call(&control.Request{Op: control.OpMigrate, Name: "vm-m", XML: e.domainXML("vm-m", migUUID)})
	if err == nil || !strings.Contains(err.Error(), "no migration block") || !strings.Contains(err.Error(), "docs/migration.md") {
		t.Fatalf("migrate without a migration block: %v", err)
	}
}

func TestMigrateUnknownVM(t *testing.T) {
	_, b := migHosts(t)
	_, err := b.call(&control.Request{Op: control.OpMigrate, Name: "vm-x", XML: b.domainXML("vm-x", migUUID)})
	if err == nil || !strings.Contains(err.Error(), "no live VM vm-x") {
		t.Fatalf("migrate of a VM no peer runs: %v", err)
	}
}

// A VM with a bridge-served vTPM: the destination's vTPM socket exists at
// prepare (QEMU connects to it as it starts and moves its state blobs
// through it), the vTPM is incoming until the handover, then adopts the
// vPCRs the source had when the VM stopped.
func TestMigrationVTPM(t *testing.T) {
	a, b := migHosts(t)
	withTPM := func(e *env) string {
		sock := filepath.Join(e.cfg.VTPMDir, "vm-v.sock")
		return strings.Replace(e.domainXML("vm-v", migUUID), "</devices>", "<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='"+sock+"'/></backend></tpm></devices>", 1)
	}
	xa, xb := withTPM(a), withTPM(b)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	want, err := a.d.vtpmSnapshot("vm-v")
	if err != nil || want == nil {
		t.Fatalf("source vTPM snapshot: %v %v", want, err)
	}
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-v", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	if _, err := os.Stat(filepath.Join(b.cfg.VTPMDir, "vm-v.sock")); err != nil {
		t.Fatalf("no vTPM socket on the destination at prepare: %v", err)
	}
	in := b.d.incomingOf("vm-v")
	if in == nil || in.e.vtpm == nil || !in.e.vtpm.v.Incoming() {
		t.Fatal("the destination's vTPM is not incoming")
	}
	a.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-v", Reason: "-"})
	a.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-v", Reason: "-"})
	waitFor(t, "the VM live on the destination, its vTPM adopted", func() bool {
		v := vmRow(t, b, "vm-v", false)
		return v != nil && v.Live && vtpmAdopted(b, "vm-v")
	})
	e := b.d.entry("vm-v")
	if e == nil || e.vtpm == nil || e.vtpm.v.Incoming() {
		t.Fatal("the destination's vTPM did not adopt the handover")
	}
	got := e.vtpm.v.PCRs().Snapshot()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("vPCRs on the destination %+v, want the source's %+v", got, want)
	}
	nonce := []byte("verifier nonce 2")
	ev := b.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-v", Nonce: nonce}).Evidence
	if rep := verifyChain(t, ev, nonce, a.tp, b.tp); len(rep.Segments) != 2 {
		t.Fatalf("%d segments", len(rep.Segments))
	}
}

// The destination's bridge restarts mid-migration (after the incoming
// domain's prepare): the new process takes the incoming migration up from
// its state directory, reopens the VM's sockets and receives the handover
// when the source stops; the VM arrives with its chain.
func TestMigrationDestRestart(t *testing.T) {
	a, b := migHosts(t)
	xa, xb := a.domainXML("vm-r", migUUID), b.domainXML("vm-r", migUUID)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-r", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	b.stop()
	if a.mustCall(&control.Request{Op: control.OpStatus}).Status.Migration.Reserved != 1 {
		t.Fatal("the destination's shutdown cancelled the reservation")
	}
	b.start()
	if b.d.incomingOf("vm-r") == nil {
		t.Fatal("the restarted destination did not take the incoming migration up")
	}
	if _, err := os.Stat(b.serialPath("vm-r")); err != nil {
		t.Fatalf("no serial socket after the restart: %v", err)
	}
	a.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-r", Reason: "-"})
	a.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-r", Reason: "migrated"})
	waitFor(t, "the VM live on the destination", func() bool { v := vmRow(t, b, "vm-r", false); return v != nil && v.Live })
	nonce := []byte("verifier nonce 3")
	ev := b.mustCall(&control.Request{Op: control.OpEvidence, VM: "vm-r", Nonce: nonce}).Evidence
	if rep := verifyChain(t, ev, nonce, a.tp, b.tp); len(rep.Segments) != 2 {
		t.Fatalf("%d segments", len(rep.Segments))
	}
	// The incoming migration's file goes once the handover is done (just
	// after the VM shows live).
	waitFor(t, "the incoming migration's file removed", func() bool {
		ents, _ := os.ReadDir(filepath.Join(b.cfg.StateDir, "migration", "in"))
		return len(ents) == 0
	})
}

// The source's bridge misses the stop (it was down): reconciliation finds
// the reserved VM gone from libvirt and hands it over instead of tearing
// it down.
func TestMigrationSourceMissedStop(t *testing.T) {
	a, b := migHosts(t)
	xa, xb := a.domainXML("vm-s", migUUID), b.domainXML("vm-s", migUUID)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-s", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	a.stop()
	a.start()
	id, ok := a.d.mux.Lookup("vm-s")
	if !ok {
		t.Fatal("the source lost the VM in its restart")
	}
	var u [16]byte
	copy(u[:], []byte{0x0b, 0x5e, 0x1c, 0x7a, 0x8d, 0x2f, 0x4e, 0x61, 0x9a, 0x3b, 0x7c, 0x4d, 0x5e, 0x6f, 0x70, 0x81})
	if err := a.d.LibvirtHost().Teardown(t.Context(), libvirt.KnownVM{ID: id, Name: "vm-s", UUID: u}, libvirt.ReasonMissedStop); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the VM live on the destination", func() bool { v := vmRow(t, b, "vm-s", false); return v != nil && v.Live })
	if v := vmRow(t, a, "vm-s", true); v == nil || v.EndedBy != "migrated-out" {
		t.Fatalf("source row %+v", v)
	}
}
