package mux_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// TestKeysSealedAtRest: with a TPM that can seal, no VM key is in the
// state directory in clear, and the keys come back after a restart.
func TestKeysSealedAtRest(t *testing.T) {
	r := newRig(t, mux.Config{})
	sealer := r.tpm.TPM.(tpm.Sealer)
	r.close()
	// A fresh store on a fresh PCR: the rig's store already extended 13.
	r.path = filepath.Join(t.TempDir(), "sealed.db")
	cfg := mux.Config{Sealer: sealer, PCR: 14}
	r.open(cfg)
	if !r.m.KeysSealed() {
		t.Fatal("keys not sealed although the TPM can seal")
	}
	a, b := r.vm("vm-a"), r.vm("vm-b")
	r.close()
	segs, _ := filepath.Glob(filepath.Join(logstore.WALDir(r.path), "*"))
	for _, p := range append(segs, r.path) {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range [][32]byte{a.Key, b.Key} {
			if bytes.Contains(raw, k[:]) {
				t.Fatalf("a VM key is in %s in clear", p)
			}
		}
	}
	r.open(cfg)
	got, err := r.m.Identity(a.ID())
	if err != nil || got.Key != a.Key {
		t.Fatalf("key after restart: %v", err)
	}
	r.close()
	// Without the TPM's sealing the store does not open its keys.
	st, err := logstore.Open(r.path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := mux.Open(context.Background(), r.tpm, st, mux.Config{}); err == nil {
		t.Fatal("opened sealed keys without the sealer")
	}
}

// TestRetentionForgets: after the retention, an ended VM's key and records
// are destroyed; the log still verifies for the others, and after a
// compaction the file holds none of its record bytes.
func TestRetentionForgets(t *testing.T) {
	now := time.Unix(1000, 0)
	clock := func() time.Time { return now }
	cfg := mux.Config{KeyRetention: time.Hour, Now: clock}
	r := newRig(t, cfg)
	r.close()
	r.open(cfg)
	a, b := r.vm("vm-a"), r.vm("vm-b")
	secret := &record.Record{Kind: record.KindMeasurement, Measurement: &record.Measurement{PCR: 10, TemplateHashAlg: "sha256",
		TemplateHash: make([]byte, 32), Template: "ima-ng", TemplateData: []byte("/very/secret/path-of-vm-a"), LogIndex: 1}}
	if _, err := r.m.Append(context.Background(), a.ID(), secret); err != nil {
		t.Fatal(err)
	}
	if _, err := r.m.Teardown(context.Background(), a.ID(), "destroyed"); err != nil {
		t.Fatal(err)
	}
	if n, err := r.m.ForgetExpired(now.Add(59 * time.Minute)); n != 0 || err != nil {
		t.Fatalf("forgot %d before the retention: %v", n, err)
	}
	if n, err := r.m.ForgetExpired(now.Add(61 * time.Minute)); n != 1 || err != nil {
		t.Fatalf("forgot %d: %v", n, err)
	}
	if _, err := r.m.Identity(a.ID()); !errors.Is(err, mux.ErrForgotten) {
		t.Fatalf("identity after forgetting: %v", err)
	}
	if _, err := r.m.FinalEvidence(a.ID()); err == nil {
		t.Fatal("final evidence of a forgotten VM")
	}
	if n := r.verified(b); n != 1 {
		t.Fatalf("B after A was forgotten: %d records", n)
	}
	// ForgetExpired compacted the store in use: the file on disk and its
	// write-ahead log hold none of the forgotten VM's data, and the bridge
	// goes on committing.
	segs, _ := filepath.Glob(filepath.Join(logstore.WALDir(r.path), "*"))
	if len(segs) == 0 {
		t.Fatal("no write-ahead log segment: the check below would check nothing of it")
	}
	for _, p := range append(segs, r.path) {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(raw, []byte("/very/secret/path-of-vm-a")) || bytes.Contains(raw, a.Key[:]) {
			t.Fatalf("%s still holds the forgotten VM's data after ForgetExpired", p)
		}
	}
	if _, err := r.m.Append(context.Background(), b.ID(), meas(2)); err != nil {
		t.Fatalf("append after compaction: %v", err)
	}
	if n := r.verified(b); n != 2 {
		t.Fatalf("B after compaction: %d records", n)
	}
	r.close()
	r.open(cfg)
	if f := r.m.Status().Fault; f != "" {
		t.Fatalf("after compaction: %s", f)
	}
	if n := r.verified(b); n != 2 {
		t.Fatalf("B after compaction and a restart: %d", n)
	}
}
