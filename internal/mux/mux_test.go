package mux_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fxamacker/cbor/v2"
	bolt "go.etcd.io/bbolt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// flakyTPM wraps a real TPM and injects extend faults.
type flakyTPM struct {
	tpm.TPM
	failBefore atomic.Int32                  // fail this many extends without extending, then go down
	failAfter  atomic.Int32                  // extend, then report failure this many times and go down
	delay      time.Duration                 // added to every extend (a slow TPM)
	gate       chan struct{}                 // when set, each extend waits for a value
	hold       atomic.Pointer[chan struct{}] // like gate, settable while running
	extends    atomic.Int64
	down       atomic.Bool // the TPM answers nothing until cleared
	quoteDelay time.Duration
	quoteHold  atomic.Pointer[chan struct{}] // when set, each quote waits until it is closed
	quotes     atomic.Int64
}

func (f *flakyTPM) Quote(ctx context.Context, pcrs []int, extra []byte) (tpm.Quote, error) {
	f.quotes.Add(1)
	if h := f.quoteHold.Load(); h != nil {
		<-*h
	}
	if f.quoteDelay > 0 {
		time.Sleep(f.quoteDelay)
	}
	return f.TPM.Quote(ctx, pcrs, extra)
}

func (f *flakyTPM) ReadPCRs(ctx context.Context, pcrs []int) ([][32]byte, error) {
	if f.down.Load() {
		return nil, errors.New("injected: TPM does not answer")
	}
	return f.TPM.ReadPCRs(ctx, pcrs)
}

func (f *flakyTPM) Extend(ctx context.Context, pcr int, d [32]byte) error {
	if f.gate != nil {
		<-f.gate
	}
	if h := f.hold.Load(); h != nil {
		<-*h
	}
	if f.delay > 0 {
		time.Sleep(f.delay)
	}
	if f.down.Load() {
		return errors.New("injected: TPM does not answer")
	}
	if f.failBefore.Load() > 0 {
		f.failBefore.Add(-1)
		f.down.Store(true)
		return errors.New("injected: TPM did not answer")
	}
	f.extends.Add(1)
	err := f.TPM.Extend(ctx, pcr, d)
	if err == nil && f.failAfter.Load() > 0 {
		f.failAfter.Add(-1)
		f.down.Store(true)
		return errors.New("injected: response lost after extend")
	}
	return err
}

type rig struct {
	t     *testing.T
	tpm   *flakyTPM
	path  string
	store *logstore.Store
	m     *mux.Mux
}

func newRig(t *testing.T, cfg mux.Config) *rig {
	t.Helper()
	real, err := tpm.Open(context.Background(), "sim")
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, tpm: &flakyTPM{TPM: real}, path: filepath.Join(t.TempDir(), "log.db")}
	t.Cleanup(func() {
		if r.m != nil {
			r.m.Close()
		}
		if r.store != nil {
			r.store.Close()
		}
		real.Close()
	})
	r.open(cfg)
	return r
}

func (r *rig) open(cfg mux.Config) {
	r.t.Helper()
	st, err := logstore.Open(r.path, &logstore.Options{NoSync: true})
	if err != nil {
		r.t.Fatal(err)
	}
	m, err := mux.Open(context.Background(), r.tpm, st, cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	r.store, r.m = st, m
}

func (r *rig) close() {
	r.m.Close()
	r.store.Close()
	r.m, r.store = nil, nil
}

func (r *rig) vm(name string) *conceal.Identity {
	r.t.Helper()
	id, err := r.m.NewVM(context.Background(), mux.Launch{UUID: [16]byte{byte(len(name)), name[len(name)-1]}, Name: name})
	if err != nil {
		r.t.Fatal(err)
	}
	return id
}

func meas(i int) *record.Record {
	return &record.Record{Kind: record.KindMeasurement, Time: int64(i), Measurement: &record.Measurement{
		PCR: 10, TemplateHashAlg: "sha256", TemplateHash: make([]byte, 32), Template: "ima-ng", TemplateData: []byte(fmt.Sprint(i)), LogIndex: uint64(i)}}
}

// verified checks fresh evidence for ident and returns its record count.
func (r *rig) verified(ident *conceal.Identity) int {
	r.t.Helper()
	nonce := []byte(fmt.Sprint(time.Now().UnixNano()))
	ev, err := r.m.Evidence(context.Background(), ident.ID(), nonce)
	if err != nil {
		r.t.Fatalf("evidence: %v", err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AK: r.tpm.AK(), PCR: 13})
	if err != nil {
		r.t.Fatalf("verify: %v", err)
	}
	return rep.Records
}

func TestRestartReplays(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	for i := 1; i <= 5; i++ {
		if _, err := r.m.Append(context.Background(), a.ID(), meas(i)); err != nil {
			t.Fatal(err)
		}
	}
	before := r.m.Status()
	r.close()
	r.open(mux.Config{})
	after := r.m.Status()
	if after.Fault != "" || after.Epoch != before.Epoch || after.Batches != before.Batches || after.PCRValue != before.PCRValue {
		t.Fatalf("after restart %+v, before %+v", after, before)
	}
	if n := r.verified(a); n != 6 {
		t.Fatalf("%d records after restart, want 6", n)
	}
	if _, err := r.m.Append(context.Background(), a.ID(), meas(6)); err != nil {
		t.Fatalf("append after restart: %v", err)
	}
	if n := r.verified(a); n != 7 {
		t.Fatalf("%d records, want 7", n)
	}
}

// TestAckOnlyAfterExtend: a record is acknowledged only once its batch is
// durable and extended.
func TestAckOnlyAfterExtend(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	r.tpm.gate = make(chan struct{})
	tk, err := r.m.Submit(a.ID(), meas(1))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, err := r.m.NextSeq(a.ID())
		if err != nil {
			t.Fatal(err)
		}
		if n == 2 {
			break // durable
		}
		if time.Now().After(deadline) {
			t.Fatal("record never became durable")
		}
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := tk.Wait(ctx); err == nil {
		t.Fatal("acknowledged while the extend had not run")
	}
	r.tpm.gate <- struct{}{}
	close(r.tpm.gate)
	if _, err := tk.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.tpm.gate = nil
}

// TestGroupCommit: while one extend runs the next batch fills, so many
// concurrent VMs need far fewer extends than records.
func TestGroupCommit(t *testing.T) {
	r := newRig(t, mux.Config{})
	const vms, per = 50, 20
	ids := make([]*conceal.Identity, vms)
	for i := range ids {
		ids[i] = r.vm(fmt.Sprintf("vm-%02d", i))
	}
	r.tpm.delay = 3 * time.Millisecond // the hardware profile's extend
	base := r.tpm.extends.Load()
	var wg sync.WaitGroup
	errs := make(chan error, vms)
	for _, id := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 1; j <= per; j++ {
				if _, err := r.m.Append(context.Background(), id.ID(), meas(j)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	extends := r.tpm.extends.Load() - base
	t.Logf("%d records in %d extends", vms*per, extends)
	if extends*5 > vms*per {
		t.Fatalf("%d extends for %d records: no group commit", extends, vms*per)
	}
	r.tpm.delay = 0
	for _, id := range ids[:3] {
		if n := r.verified(id); n != per+1 {
			t.Fatalf("%d records, want %d", n, per+1)
		}
	}
}

// TestExtendFaultHeals: an extend that fails leaves a durable, unextended
// batch; the mux refuses to acknowledge or serve evidence until it has
// brought the PCR back in step, then carries on with nothing lost.
func TestExtendFaultHeals(t *testing.T) {
	for _, mode := range []string{"before", "after"} {
		t.Run("fail "+mode+" extending", func(t *testing.T) {
			r := newRig(t, mux.Config{})
			a := r.vm("vm-a")
			if mode == "before" {
				r.tpm.failBefore.Store(1)
			} else {
				r.tpm.failAfter.Store(1)
			}
			if _, err := r.m.Append(context.Background(), a.ID(), meas(1)); err == nil {
				t.Fatal("acknowledged a record whose extend failed")
			}
			if _, err := r.m.Evidence(context.Background(), a.ID(), []byte("n")); err == nil {
				t.Fatal("served evidence while faulted")
			}
			if _, err := r.m.Submit(a.ID(), meas(2)); err == nil {
				t.Fatal("accepted a record while faulted")
			}
			r.tpm.down.Store(false)
			deadline := time.Now().Add(5 * time.Second)
			for r.m.Status().Fault != "" {
				if time.Now().After(deadline) {
					t.Fatalf("never healed: %s", r.m.Status().Fault)
				}
				time.Sleep(20 * time.Millisecond)
			}
			if n := r.verified(a); n != 2 {
				t.Fatalf("%d records after healing, want 2 (genesis and the durable record)", n)
			}
			if _, err := r.m.Append(context.Background(), a.ID(), meas(2)); err != nil {
				t.Fatal(err)
			}
			if n := r.verified(a); n != 3 {
				t.Fatalf("%d records, want 3", n)
			}
		})
	}
}

// TestRecoverUnextendedBatchOnRestart: the bridge died between the durable
// write and the extend; the next start extends the batch.
func TestRecoverUnextendedBatchOnRestart(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	r.tpm.failBefore.Store(1) // the TPM is gone for this bridge
	if _, err := r.m.Append(context.Background(), a.ID(), meas(1)); err == nil {
		t.Fatal("acknowledged without extend")
	}
	r.close()
	r.tpm.down.Store(false)
	r.open(mux.Config{})
	if f := r.m.Status().Fault; f != "" {
		t.Fatalf("faulted after restart: %s", f)
	}
	if n := r.verified(a); n != 2 {
		t.Fatalf("%d records, want 2", n)
	}
}

// TestForeignExtendRefused: someone else extended the PCR; the log no
// longer replays, so the bridge refuses and says why.
func TestForeignExtendRefused(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	r.close()
	if err := r.tpm.TPM.Extend(context.Background(), mux.DefaultPCR, [32]byte{1}); err != nil {
		t.Fatal(err)
	}
	r.open(mux.Config{})
	st := r.m.Status()
	if !strings.Contains(st.Fault, "PCR 13 is") || !strings.Contains(st.Fault, "replays to") {
		t.Fatalf("fault = %q", st.Fault)
	}
	if _, err := r.m.Evidence(context.Background(), a.ID(), []byte("n")); err == nil || !strings.Contains(err.Error(), "not serving evidence") {
		t.Fatalf("evidence: %v", err)
	}
	if _, err := r.m.Submit(a.ID(), meas(1)); err == nil || !strings.Contains(err.Error(), "not acknowledging") {
		t.Fatalf("submit: %v", err)
	}
}

// TestCorruptStoreRefused: a batch altered at rest does not replay.
func TestCorruptStoreRefused(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	if _, err := r.m.Append(context.Background(), a.ID(), meas(1)); err != nil {
		t.Fatal(err)
	}
	r.close()
	db, err := bolt.Open(r.path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket([]byte("batches"))
		key := make([]byte, 16)
		binary.BigEndian.PutUint64(key[:8], 1)
		binary.BigEndian.PutUint64(key[8:], 1)
		var b logstore.Batch
		if err := cbor.Unmarshal(bk.Get(key), &b); err != nil {
			return err
		}
		b.Entries[3] ^= 1
		raw, _ := cbor.Marshal(&b)
		return bk.Put(key, raw)
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	r.open(mux.Config{})
	if st := r.m.Status(); !strings.Contains(st.Fault, "store corrupted") {
		t.Fatalf("fault = %q", st.Fault)
	}
}

// TestHostReboot: a TPM reset starts a new epoch; live VMs of the old one
// end, and a torn-down VM stays verifiable post mortem.
func TestHostReboot(t *testing.T) {
	r := newRig(t, mux.Config{})
	a, b := r.vm("vm-a"), r.vm("vm-b")
	if _, err := r.m.Append(context.Background(), a.ID(), meas(1)); err != nil {
		t.Fatal(err)
	}
	if _, err := r.m.Teardown(context.Background(), a.ID(), "shutdown"); err != nil {
		t.Fatal(err)
	}
	r.close()
	if err := r.tpm.TPM.(tpm.Resetter).Reset(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.open(mux.Config{})
	st := r.m.Status()
	if st.Fault != "" || st.Epoch != 2 {
		t.Fatalf("after reboot: %+v", st)
	}
	vms, err := r.m.VMs()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vms {
		if v.Name == "vm-b" && (!v.Ended || v.EndedBy != "epoch-ended") {
			t.Fatalf("vm-b after reboot: %+v", v)
		}
	}
	if _, err := r.m.Submit(b.ID(), meas(2)); err == nil {
		t.Fatal("accepted a record for a VM of the previous epoch")
	}
	ev, err := r.m.FinalEvidence(a.ID())
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{PostMortem: true, Identity: a, AK: r.tpm.AK(), PCR: 13})
	if err != nil || rep.Teardown == nil || rep.Teardown.Detail != "shutdown" {
		t.Fatalf("post-mortem after reboot: %v %+v", err, rep)
	}
	if rep.Quote.ResetCount != 0 {
		t.Fatalf("final quote reset count %d: it should predate the reboot", rep.Quote.ResetCount)
	}
	c := r.vm("vm-c")
	if n := r.verified(c); n != 1 {
		t.Fatalf("new epoch VM has %d records", n)
	}
}

func TestTeardownRules(t *testing.T) {
	r := newRig(t, mux.Config{})
	a := r.vm("vm-a")
	if _, err := r.m.Teardown(context.Background(), a.ID(), "destroyed"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.m.Teardown(context.Background(), a.ID(), "destroyed"); err != nil {
		t.Fatalf("second teardown (libvirt fires stopped and release): %v", err)
	}
	if _, err := r.m.Submit(a.ID(), meas(1)); !errors.Is(err, mux.ErrUnknownVM) && !errors.Is(err, mux.ErrEnded) {
		t.Fatalf("record after teardown: %v", err)
	}
	if _, err := r.m.Submit(a.ID(), &record.Record{Kind: record.KindGenesis, Genesis: &record.Genesis{}}); err == nil {
		t.Fatal("accepted a genesis through Submit")
	}
	b := r.vm("vm-b")
	td := &record.Record{Kind: record.KindTeardown, Teardown: &record.Teardown{Reason: "x"}}
	if _, err := r.m.Submit(b.ID(), td, meas(1)); err == nil {
		t.Fatal("accepted a record after a teardown in one submission")
	}
}

// TestBatchedQuotes: concurrent verifiers share quotes; each gets a Merkle
// path to its own H(nonce || id), which verifies for its nonce and VM only.
func TestBatchedQuotes(t *testing.T) {
	r := newRig(t, mux.Config{})
	a, b := r.vm("vm-a"), r.vm("vm-b")
	r.tpm.quoteDelay = 20 * time.Millisecond
	base := r.tpm.quotes.Load()
	const n = 24
	type result struct {
		ident *conceal.Identity
		nonce []byte
		ev    *evidence.Evidence
		err   error
	}
	out := make(chan result, n)
	for i := 0; i < n; i++ {
		ident := a
		if i%2 == 1 {
			ident = b
		}
		nonce := []byte(fmt.Sprintf("nonce-%d of the verifier", i))
		go func() {
			ev, err := r.m.Evidence(context.Background(), ident.ID(), nonce)
			out <- result{ident, nonce, ev, err}
		}()
	}
	batched := 0
	var results []result
	for i := 0; i < n; i++ {
		res := <-out
		if res.err != nil {
			t.Fatal(res.err)
		}
		results = append(results, res)
		rep, err := verify.Verify(res.ev, verify.Options{Nonce: res.nonce, Identity: res.ident, AK: r.tpm.AK(), PCR: 13})
		if err != nil {
			t.Fatalf("batched evidence rejected: %v", err)
		}
		if rep.Batched {
			batched++
		}
	}
	quotes := r.tpm.quotes.Load() - base
	t.Logf("%d requests, %d quotes, %d batched", n, quotes, batched)
	if quotes >= n || batched == 0 {
		t.Fatalf("%d quotes for %d requests, %d batched: no batching", quotes, n, batched)
	}
	// Another request's nonce, or another VM's identity, does not verify.
	for _, res := range results {
		if res.ev.Batched == nil {
			continue
		}
		other := results[0]
		if other.ev == res.ev {
			other = results[1]
		}
		if _, err := verify.Verify(res.ev, verify.Options{Nonce: other.nonce, Identity: res.ident, AK: r.tpm.AK(), PCR: 13}); err == nil {
			t.Fatal("batched evidence verified for another request's nonce")
		}
		wrong := a
		if res.ident == a {
			wrong = b
		}
		if _, err := verify.Verify(res.ev, verify.Options{Nonce: res.nonce, Identity: wrong, AK: r.tpm.AK(), PCR: 13}); err == nil {
			t.Fatal("batched evidence verified for another VM")
		}
		break
	}
}

// hangTPM stops answering extends while hung (they wait for the caller's
// deadline), as a wedged TPM or a stopped swtpm would.
type hangTPM struct {
	*flakyTPM
	hung atomic.Bool
}

func (h *hangTPM) Extend(ctx context.Context, pcr int, d [32]byte) error {
	for h.hung.Load() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return h.flakyTPM.Extend(ctx, pcr, d)
}

// TestTPMStopsAnswering: a TPM that hangs faults the mux within its
// timeout (no acks, no evidence, the reason in Status); when the TPM
// answers again the mux heals and nothing durable is lost.
func TestTPMStopsAnswering(t *testing.T) {
	r := newRig(t, mux.Config{})
	r.close()
	h := &hangTPM{flakyTPM: r.tpm}
	st, err := logstore.Open(r.path, &logstore.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mux.Open(context.Background(), h, st, mux.Config{TPMTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	r.store, r.m = st, m
	a := r.vm("vm-a")
	h.hung.Store(true)
	start := time.Now()
	if _, err := r.m.Append(context.Background(), a.ID(), meas(1)); err == nil {
		t.Fatal("acknowledged while the TPM did not answer")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the fault took %v", d)
	}
	st2 := r.m.Status()
	if !strings.Contains(st2.Fault, "did not answer") {
		t.Fatalf("fault = %q", st2.Fault)
	}
	if _, err := r.m.Evidence(context.Background(), a.ID(), []byte("n")); err == nil {
		t.Fatal("served evidence while the TPM hung")
	}
	h.hung.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for r.m.Status().Fault != "" {
		if time.Now().After(deadline) {
			t.Fatalf("never healed: %s", r.m.Status().Fault)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := r.verified(a); n != 2 {
		t.Fatalf("%d records after the TPM came back, want 2", n)
	}
}
