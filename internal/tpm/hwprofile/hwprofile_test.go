package hwprofile

import (
	"context"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm"
)

// These tests check what the wrapper does, never how fast the machine is:
// every time bound is a lower bound the wrapper itself guarantees.

func TestProfileDelaysAndCounts(t *testing.T) {
	ctx := context.Background()
	inner, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	p := Profile{Extend: 5 * time.Millisecond, Quote: 20 * time.Millisecond, PCRRead: 2 * time.Millisecond}
	w := New(inner, p)
	defer w.Close()

	start := time.Now()
	if err := w.Extend(ctx, 16, [32]byte{1}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < p.Extend {
		t.Errorf("extend took %v, profile says at least %v", d, p.Extend)
	}
	// Ten PCRs take two TPM2_PCR_Read commands.
	start = time.Now()
	vals, err := w.ReadPCRs(ctx, []int{0, 1, 2, 3, 4, 5, 6, 7, 10, 16})
	if err != nil {
		t.Fatal(err)
	}
	if len(vals) != 10 {
		t.Fatalf("%d values", len(vals))
	}
	if d := time.Since(start); d < 2*p.PCRRead {
		t.Errorf("read of 10 PCRs took %v, profile says at least %v", d, 2*p.PCRRead)
	}
	start = time.Now()
	if _, err := w.Quote(ctx, []int{16}, []byte("nonce")); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < p.Quote {
		t.Errorf("quote took %v, profile says at least %v", d, p.Quote)
	}
	st := w.Stats()
	if st.Extends != 1 || st.PCRReads != 2 || st.Quotes != 1 {
		t.Errorf("stats %+v, want 1 extend, 2 PCR reads, 1 quote", st)
	}
	if w.AK() == nil || w.AK() != inner.AK() {
		t.Error("AK not passed through")
	}
}

func TestEndedContextFailsFast(t *testing.T) {
	inner, err := tpm.Open(context.Background(), "sim")
	if err != nil {
		t.Fatal(err)
	}
	w := New(inner, Profile{Quote: time.Hour})
	defer w.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := w.Quote(ctx, []int{16}, nil); err == nil {
		t.Fatal("quote with an ended context succeeded")
	}
	if st := w.Stats(); st.Quotes != 0 {
		t.Errorf("an ended context still sent %d quotes", st.Quotes)
	}
}

func TestWrapKeepsSealing(t *testing.T) {
	inner, err := tpm.Open(context.Background(), "sim")
	if err != nil {
		t.Fatal(err)
	}
	w := Wrap(inner, Default)
	defer w.Close()
	_, innerSeals := inner.(sealer)
	_, wrapSeals := w.(sealer)
	if innerSeals != wrapSeals {
		t.Fatalf("inner seals: %v, wrapper seals: %v", innerSeals, wrapSeals)
	}
	if !wrapSeals {
		return
	}
	s := w.(sealer)
	blob, err := s.Seal(context.Background(), []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	back, err := s.Unseal(context.Background(), blob)
	if err != nil || string(back) != "secret" {
		t.Fatalf("unseal: %q, %v", back, err)
	}
}
