package mux_test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// tool finds a tpm2-tools binary; in CI a missing one is a failure.
func tool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s is missing: %v", name, err)
		}
		t.Skipf("skipping: %s not installed (bash scripts/setup.sh test): %v", name, err)
	}
	return p
}

func startSwtpm(t *testing.T) *swtpmproc.Proc {
	t.Helper()
	if err := swtpmproc.Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	p, err := swtpmproc.Start(t.Context(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop() })
	return p
}

func tctiOf(p *swtpmproc.Proc) string {
	return "swtpm:host=127.0.0.1,port=" + strings.TrimPrefix(p.Addr(), "127.0.0.1:")
}

// history is a VM with seven records (genesis, measurements, an action a
// host root would like to hide), each its own batch, with the evidence a
// verifier checked and the checkpoint it kept.
type history struct {
	a     *conceal.Identity
	ev    *evidence.Evidence
	rep   *verify.Report
	store string
}

func makeHistory(t *testing.T, spec string, cfg mux.Config) history {
	t.Helper()
	ctx := t.Context()
	tp, err := tpm.Open(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	path := t.TempDir() + "/log.db"
	st, err := logstore.Open(path, &logstore.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0xa1}, Name: "vm-a"})
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		if _, err := m.Append(ctx, a.ID(), meas(i)); err != nil {
			t.Fatal(err)
		}
	}
	act := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "pause", Detail: "policy violation at record 5"}}
	if _, err := m.Append(ctx, a.ID(), act); err != nil {
		t.Fatal(err)
	}
	nonce := []byte("the verifier's first nonce, 32 b")
	ev, err := m.Evidence(ctx, a.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: a, AK: tp.AK(), PCR: cfg.PCR, AllowResettablePCR: cfg.InsecureResettablePCR})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Records != 7 || rep.Counts.Actions != 1 {
		t.Fatalf("history has %d records, %d actions", rep.Records, rep.Counts.Actions)
	}
	return history{a: a, ev: ev, rep: rep, store: path}
}

// TestResetAndTruncateAttack is the attack of a host root after the fact:
// reset the anchor PCR with tpm2-tools, re-extend a prefix of the public
// log (hiding the VM's last records, among them a pause action), quote a
// fresh nonce with the genuine AK and hand the verifier the truncated log.
//
// On the default PCR 13 the reset itself fails (PC-client: resettable at
// locality 0 are only 16 and 23). On PCR 23, allowed only by the insecure
// flags, the TPM lets it happen, and then the verifier still rejects: by
// default because it refuses a resettable PCR, and with that check
// disabled because its high-water mark from the earlier verification
// shows the history shrank.
func TestResetAndTruncateAttack(t *testing.T) {
	pcrreset, pcrread := tool(t, "tpm2_pcrreset"), tool(t, "tpm2_pcrread")
	p := startSwtpm(t)

	// Default PCR 13: the reset is refused by the TPM.
	h := makeHistory(t, p.Spec(), mux.Config{MaxBatch: 1})
	before, _ := exec.Command(pcrread, "-T", tctiOf(p), "sha256:13").CombinedOutput()
	out, err := exec.Command(pcrreset, "-T", tctiOf(p), "13").CombinedOutput()
	if err == nil {
		t.Fatalf("tpm2_pcrreset 13 succeeded:\n%s", out)
	}
	t.Logf("tpm2_pcrreset 13 refused as expected: %s", strings.TrimSpace(string(out)))
	after, _ := exec.Command(pcrread, "-T", tctiOf(p), "sha256:13").CombinedOutput()
	if string(before) != string(after) {
		t.Fatalf("PCR 13 changed: %s -> %s", before, after)
	}
	// The bridge refuses a resettable PCR unless told it is a test.
	func() {
		tp, err := tpm.Open(t.Context(), p.Spec())
		if err != nil {
			t.Fatal(err)
		}
		defer tp.Close()
		st, err := logstore.Open(t.TempDir()+"/log.db", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		if _, err := mux.Open(t.Context(), tp, st, mux.Config{PCR: 23}); err == nil || !strings.Contains(err.Error(), "reset without a reboot") {
			t.Fatalf("mux on PCR 23: %v, want a refusal", err)
		}
	}()

	// Insecure PCR 23: the attack proceeds on the TPM.
	cfg := mux.Config{PCR: 23, InsecureResettablePCR: true, MaxBatch: 1}
	h = makeHistory(t, p.Spec(), cfg)
	if out, err := exec.Command(pcrreset, "-T", tctiOf(p), "23").CombinedOutput(); err != nil {
		t.Fatalf("tpm2_pcrreset 23: %v\n%s", err, out)
	}
	// Keep the epoch batch, genesis and one measurement: 2 of 7 records.
	// (A cut of at most maxUnextended (4) batches looks like a crash
	// between durable writes and their extends, and the bridge re-extends
	// the missing batches from its store: that restores the history.)
	const keep = 2
	forged := *h.ev
	forged.Log = h.ev.Log[:keep+1]
	forged.Records = h.ev.Records[:keep]
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for _, b := range forged.Log {
		v, _, err := conceal.BatchValue(b.G0, forged.Epoch.Record, b.Entries)
		if err != nil {
			t.Fatal(err)
		}
		if err := tp.Extend(ctx, 23, v); err != nil {
			t.Fatal(err)
		}
	}
	nonce := []byte("the verifier's second nonce, 32b")
	sel := make([]int, len(forged.PCRValues))
	for i, pv := range forged.PCRValues {
		sel[i] = int(pv.Index)
	}
	nd := conceal.NonceData(nonce, h.a.ID())
	q, err := tp.Quote(ctx, sel, nd[:])
	if err != nil {
		t.Fatal(err)
	}
	vals, err := tp.ReadPCRs(ctx, sel)
	if err != nil {
		t.Fatal(err)
	}
	ak := tp.AK()
	tp.Close()
	forged.Quote = evidence.Quote{Attest: q.Attest, Signature: q.Signature}
	forged.PCRValues = nil
	for i, pcr := range sel {
		forged.PCRValues = append(forged.PCRValues, evidence.PCRValue{Index: uint32(pcr), SHA256: vals[i][:]})
	}
	forged.Batched = nil

	// A verifier that opted into the insecure PCR and never saw this VM
	// before is fooled: that is exactly why PCR 23 is refused by default.
	o := verify.Options{Nonce: nonce, Identity: h.a, AK: ak, PCR: 23, AllowResettablePCR: true}
	rep, err := verify.Verify(&forged, o)
	if err != nil || rep.Records != keep {
		t.Fatalf("fixture: the truncated log did not replay (%v, %d records); the attack was not reproduced", err, rep.Records)
	}
	// The default verifier refuses the resettable PCR.
	o.AllowResettablePCR = false
	if _, err := verify.Verify(&forged, o); !verify.IsRejection(err) || !strings.Contains(err.Error(), "reset without a reboot") {
		t.Fatalf("default verifier: got %v, want a rejection of PCR 23", err)
	}
	// A verifier that checked before rejects the rollback.
	o.AllowResettablePCR = true
	o.Checkpoint = h.rep.Checkpoint
	_, err = verify.Verify(&forged, o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("verifier with a high-water mark: got %v, want a rollback rejection", err)
	}
	t.Logf("rejected: %v", err)

	// And the bridge notices: PCR 23 no longer replays from its store.
	tp, err = tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	st, err := logstore.Open(h.store, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if f := m.Status().Fault; !strings.Contains(f, "PCR 23") {
		t.Fatalf("bridge after the attack: fault %q, want one naming PCR 23", f)
	}
}

// TestResetToStartValueFaults: a PCR back at its start value within the
// same TPM power cycle (resetCount unchanged) is a reset without a reboot;
// the bridge faults with one line and does not open a new epoch.
func TestResetToStartValueFaults(t *testing.T) {
	pcrreset := tool(t, "tpm2_pcrreset")
	p := startSwtpm(t)
	cfg := mux.Config{PCR: 23, InsecureResettablePCR: true}
	h := makeHistory(t, p.Spec(), cfg)
	if out, err := exec.Command(pcrreset, "-T", tctiOf(p), "23").CombinedOutput(); err != nil {
		t.Fatalf("tpm2_pcrreset 23: %v\n%s", err, out)
	}
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	st, err := logstore.Open(h.store, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(t.Context(), tp, st, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	f := m.Status().Fault
	if !strings.Contains(f, "back at its reset value") || !strings.Contains(f, "resetCount") || strings.Contains(f, "\n") {
		t.Fatalf("fault %q, want one line naming the reset without a reboot", f)
	}
	if n := m.Status().Epoch; n != 1 {
		t.Fatalf("epoch %d, want still 1", n)
	}
	if vms, _ := m.VMs(); len(vms) != 1 || vms[0].Ended {
		t.Fatalf("vm ended by the reset: %+v", vms)
	}
}

// TestSuspendResume: restartCount changes across a suspend (TPM Resume:
// PCRs 0-15 kept) and a hibernation (TPM Restart: PCRs reset). A TPM
// Restart can reset the PCR, and nothing in its value tells a preserved
// history from a re-extended prefix, so each opens a new epoch bound to
// the new restartCount; the old epoch's evidence no longer verifies with a
// quote from after it (the quote's restartCount differs).
func TestSuspendResume(t *testing.T) {
	p := startSwtpm(t)
	cfg := mux.Config{}
	h := makeHistory(t, p.Spec(), cfg)
	for _, step := range []struct {
		name    string
		startup tpm2.TPMSU
		kept    bool // PCR 13 kept
	}{
		{"suspend to RAM (TPM Resume)", tpm2.TPMSUState, true},
		{"hibernation (TPM Restart)", tpm2.TPMSUClear, false},
	} {
		t.Run(step.name, func(t *testing.T) {
			ctx := t.Context()
			pcr13 := func() [32]byte {
				tp, err := tpm.Open(ctx, p.Spec())
				if err != nil {
					t.Fatal(err)
				}
				defer tp.Close()
				v, err := tp.ReadPCRs(ctx, []int{13})
				if err != nil {
					t.Fatal(err)
				}
				return v[0]
			}
			before := pcr13()
			sleepWake(t, p, step.startup)
			if kept := pcr13() == before; kept != step.kept {
				t.Fatalf("PCR 13 kept = %v, want %v", kept, step.kept)
			}
			tp, err := tpm.Open(ctx, p.Spec())
			if err != nil {
				t.Fatal(err)
			}
			defer tp.Close()
			st, err := logstore.Open(h.store, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			e0, _, _ := st.CurrentEpoch()
			m, err := mux.Open(ctx, tp, st, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			s := m.Status()
			if s.Fault != "" || s.Epoch != e0.Number+1 {
				t.Fatalf("after %s: epoch %d (was %d), fault %q; want a new epoch", step.name, s.Epoch, e0.Number, s.Fault)
			}
		})
	}
	// Evidence of the first epoch re-quoted after the restarts: rejected.
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	ev := *h.ev
	nonce := []byte("a nonce after the resume, 32 byt")
	nd := conceal.NonceData(nonce, h.a.ID())
	sel := make([]int, len(ev.PCRValues))
	for i, pv := range ev.PCRValues {
		sel[i] = int(pv.Index)
	}
	q, err := tp.Quote(t.Context(), sel, nd[:])
	if err != nil {
		t.Fatal(err)
	}
	vals, err := tp.ReadPCRs(t.Context(), sel)
	if err != nil {
		t.Fatal(err)
	}
	ev.Quote = evidence.Quote{Attest: q.Attest, Signature: q.Signature}
	ev.PCRValues = nil
	for i, pcr := range sel {
		ev.PCRValues = append(ev.PCRValues, evidence.PCRValue{Index: uint32(pcr), SHA256: vals[i][:]})
	}
	_, err = verify.Verify(&ev, verify.Options{Nonce: nonce, Identity: h.a, AK: tp.AK()})
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "restartCount") {
		t.Fatalf("got %v, want a rejection naming restartCount", err)
	}
}

// sleepWake plays a platform sleep and wake on swtpm: TPM2_Shutdown(STATE)
// as the OS does before suspend or hibernation, _TPM_Init as the platform
// does on wake, then TPM2_Startup(startup) as the firmware does.
func sleepWake(t *testing.T, p *swtpmproc.Proc, startup tpm2.TPMSU) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	dial := func() transport.TPMCloser {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return transport.FromReadWriteCloser(c)
	}
	conn := dial()
	if _, err := (tpm2.Shutdown{ShutdownType: tpm2.TPMSUState}).Execute(conn); err != nil {
		t.Fatalf("TPM2_Shutdown(STATE): %v", err)
	}
	conn.Close()
	if err := p.Init(ctx); err != nil {
		t.Fatal(err)
	}
	conn = dial()
	defer conn.Close()
	if _, err := (tpm2.Startup{StartupType: startup}).Execute(conn); err != nil {
		t.Fatalf("TPM2_Startup: %v", err)
	}
}
