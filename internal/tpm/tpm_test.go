package tpm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// backend opens one kind of TPM for a test; reopen gives a fresh connection
// to the same TPM (after the previous one is closed).
type backend struct {
	name string
	open func(t testing.TB) TPM
}

// openT opens spec and closes it when the test ends.
func openT(t testing.TB, spec string) TPM {
	t.Helper()
	tp, err := Open(t.Context(), spec)
	if err != nil {
		t.Fatalf("Open(%q): %v", spec, err)
	}
	t.Cleanup(func() {
		if err := tp.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return tp
}

// backends returns the backends every common test runs on: the in-process
// simulator and a real swtpm (skipped when swtpm is missing, unless CI=true).
func backends() []backend {
	return []backend{
		{"sim", func(t testing.TB) TPM { return openT(t, "sim") }},
		{"swtpm", func(t testing.TB) TPM {
			p := swtpmproc.StartTest(t)
			return openT(t, p.Spec())
		}},
	}
}

func extendHash(old [32]byte, d [32]byte) [32]byte {
	return sha256.Sum256(append(old[:], d[:]...))
}

func digest(s string) [32]byte { return sha256.Sum256([]byte(s)) }

func TestExtendRead(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			ctx := t.Context()
			tests := []struct {
				pcr int
				d   [32]byte
			}{
				{23, digest("a")},
				{23, digest("b")},
				{16, digest("c")},
				{0, [32]byte{}},
			}
			for _, tc := range tests {
				old, err := tp.ReadPCRs(ctx, []int{tc.pcr})
				if err != nil {
					t.Fatal(err)
				}
				if err := tp.Extend(ctx, tc.pcr, tc.d); err != nil {
					t.Fatal(err)
				}
				got, err := tp.ReadPCRs(ctx, []int{tc.pcr})
				if err != nil {
					t.Fatal(err)
				}
				if want := extendHash(old[0], tc.d); got[0] != want {
					t.Errorf("PCR %d after extend = %x, want H(old||d) = %x", tc.pcr, got[0], want)
				}
			}
		})
	}
}

func TestReadPCRs(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			ctx := t.Context()
			// Give every resettable-by-us PCR a distinct value.
			var want [NumPCRs][32]byte
			all := make([]int, NumPCRs)
			for i := range all {
				all[i] = i
			}
			base, err := tp.ReadPCRs(ctx, all)
			if err != nil {
				t.Fatal(err)
			}
			for i := range all {
				want[i] = base[i]
				if i >= 17 && i <= 22 {
					continue // DRTM PCRs: not extendable from locality 0
				}
				d := digest(string(rune('A' + i)))
				if err := tp.Extend(ctx, i, d); err != nil {
					t.Fatal(err)
				}
				want[i] = extendHash(base[i], d)
			}
			tests := []struct {
				name string
				pcrs []int
			}{
				{"all 24 in 3 chunks", all},
				{"descending", []int{23, 22, 10, 7, 1, 0}},
				{"duplicates", []int{5, 5, 23, 5}},
				{"exactly 8", []int{0, 1, 2, 3, 4, 5, 6, 7}},
				{"9 scattered", []int{23, 0, 17, 3, 9, 12, 15, 20, 1}},
				{"none", nil},
			}
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					got, err := tp.ReadPCRs(ctx, tc.pcrs)
					if err != nil {
						t.Fatal(err)
					}
					if len(got) != len(tc.pcrs) {
						t.Fatalf("got %d values for %d PCRs", len(got), len(tc.pcrs))
					}
					for i, p := range tc.pcrs {
						if got[i] != want[p] {
							t.Errorf("value %d (PCR %d) = %x, want %x", i, p, got[i], want[p])
						}
					}
				})
			}
		})
	}
}

func TestBadPCR(t *testing.T) {
	tp := openT(t, "sim")
	ctx := t.Context()
	for _, p := range []int{-1, NumPCRs, 1000} {
		if err := tp.Extend(ctx, p, digest("x")); err == nil || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("Extend(PCR %d) error = %v, want out of range", p, err)
		}
		if _, err := tp.ReadPCRs(ctx, []int{0, p}); err == nil {
			t.Errorf("ReadPCRs(%d) succeeded", p)
		}
		if _, err := tp.Quote(ctx, []int{p}, nil); err == nil {
			t.Errorf("Quote(%d) succeeded", p)
		}
	}
}

var quotePCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 10, 23}

func TestQuote(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			ctx := t.Context()
			if err := tp.Extend(ctx, 23, digest("batch")); err != nil {
				t.Fatal(err)
			}
			nonce := sha256.Sum256([]byte("tpmmux/v1/nonce"))
			q, err := tp.Quote(ctx, quotePCRs, nonce[:])
			if err != nil {
				t.Fatal(err)
			}
			info, err := quote.Check(q.Attest, q.Signature, tp.AK())
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if !bytes.Equal(info.ExtraData, nonce[:]) {
				t.Errorf("ExtraData = %x, want %x", info.ExtraData, nonce)
			}
			if !equalInts(info.PCRs, quotePCRs) {
				t.Errorf("PCRs = %v, want %v", info.PCRs, quotePCRs)
			}
			vals, err := tp.ReadPCRs(ctx, quotePCRs)
			if err != nil {
				t.Fatal(err)
			}
			if want := quote.PCRDigest(vals); !bytes.Equal(info.PCRDigest, want) {
				t.Errorf("PCRDigest = %x, want digest of ReadPCRs %x", info.PCRDigest, want)
			}

			t.Run("unsorted request", func(t *testing.T) {
				q2, err := tp.Quote(ctx, []int{23, 10, 0, 7, 6, 5, 4, 3, 2, 1, 23}, nil)
				if err != nil {
					t.Fatal(err)
				}
				info2, err := quote.Check(q2.Attest, q2.Signature, tp.AK())
				if err != nil {
					t.Fatal(err)
				}
				if !equalInts(info2.PCRs, quotePCRs) || !bytes.Equal(info2.PCRDigest, info.PCRDigest) || len(info2.ExtraData) != 0 {
					t.Errorf("got PCRs %v digest %x extra %x", info2.PCRs, info2.PCRDigest, info2.ExtraData)
				}
			})
			t.Run("other key fails", func(t *testing.T) {
				k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := quote.Check(q.Attest, q.Signature, &k.PublicKey); !errors.Is(err, quote.ErrSignature) {
					t.Errorf("Check with another key: %v, want ErrSignature", err)
				}
			})
			t.Run("tampered attest fails", func(t *testing.T) {
				for _, i := range []int{0, 7, len(q.Attest) / 2, len(q.Attest) - 1} {
					bad := bytes.Clone(q.Attest)
					bad[i] ^= 0x01
					if _, err := quote.Check(bad, q.Signature, tp.AK()); !errors.Is(err, quote.ErrSignature) {
						t.Errorf("byte %d flipped: %v, want ErrSignature", i, err)
					}
				}
			})
			t.Run("extraData limit", func(t *testing.T) {
				d := tp.(interface{ maxExtra() int }).maxExtra()
				if d < 34 {
					t.Fatalf("max extraData %d < 34", d)
				}
				if _, err := tp.Quote(ctx, []int{23}, make([]byte, d)); err != nil {
					t.Errorf("Quote with %d-byte extraData: %v", d, err)
				}
				if _, err := tp.Quote(ctx, []int{23}, make([]byte, d+1)); err == nil || !strings.Contains(err.Error(), "sizeof(TPMT_HA)") {
					t.Errorf("Quote with %d-byte extraData: %v, want size error", d+1, err)
				}
				t.Logf("max extraData (sizeof TPMT_HA) = %d", d)
			})
		})
	}
}

func (d *dev) maxExtra() int { return d.maxExtraData }

func TestAKStable(t *testing.T) {
	t.Run("sim reopen", func(t *testing.T) {
		a := openOnce(t, "sim")
		b := openOnce(t, "sim")
		if !a.Equal(b) {
			t.Error("sim AK differs across Close/Open")
		}
		c := openOnce(t, "sim:7")
		if a.Equal(c) {
			t.Error("sim:7 AK equals the default-seed AK")
		}
	})
	t.Run("swtpm reopen and restart", func(t *testing.T) {
		p := swtpmproc.StartTest(t)
		a := openOnce(t, p.Spec())
		b := openOnce(t, p.Spec())
		if !a.Equal(b) {
			t.Error("swtpm AK differs across Close/Open")
		}
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		p2, err := swtpmproc.StartWith(t.Context(), swtpmproc.Options{StateDir: p.StateDir(), DieWithParent: true})
		if err != nil {
			t.Fatal(err)
		}
		defer p2.Stop()
		c := openOnce(t, p2.Spec())
		if !a.Equal(c) {
			t.Error("swtpm AK differs across a swtpm restart")
		}
	})
}

func openOnce(t *testing.T, spec string) *ecdsa.PublicKey {
	t.Helper()
	tp, err := Open(t.Context(), spec)
	if err != nil {
		t.Fatal(err)
	}
	ak := tp.AK()
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	return ak
}

func TestSimReset(t *testing.T) {
	tp := openT(t, "sim")
	ctx := t.Context()
	r, ok := tp.(Resetter)
	if !ok {
		t.Fatal("sim backend does not implement Resetter")
	}
	ak := tp.AK()
	if err := tp.Extend(ctx, 23, digest("x")); err != nil {
		t.Fatal(err)
	}
	before := quoteInfo(t, tp)
	if err := r.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if !tp.AK().Equal(ak) {
		t.Error("AK differs after Reset")
	}
	v, err := tp.ReadPCRs(ctx, []int{23})
	if err != nil {
		t.Fatal(err)
	}
	if v[0] != ([32]byte{}) {
		t.Errorf("PCR 23 after Reset = %x, want zero", v[0])
	}
	after := quoteInfo(t, tp)
	if after.ResetCount != before.ResetCount+1 {
		t.Errorf("reset count %d -> %d, want +1", before.ResetCount, after.ResetCount)
	}
	// Extend still works on the re-created state.
	if err := tp.Extend(ctx, 23, digest("y")); err != nil {
		t.Fatal(err)
	}
}

func quoteInfo(t *testing.T, tp TPM) *quote.Info {
	t.Helper()
	q, err := tp.Quote(t.Context(), []int{23}, []byte("n"))
	if err != nil {
		t.Fatal(err)
	}
	info, err := quote.Check(q.Attest, q.Signature, tp.AK())
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func TestSimSingleton(t *testing.T) {
	tp := openT(t, "sim")
	done := make(chan error, 1)
	go func() {
		_, err := Open(context.Background(), "sim")
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "already open") {
			t.Errorf("second Open(sim) = %v, want an already-open error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("second Open(sim) blocked")
	}
	_ = tp
}

func TestOpenErrors(t *testing.T) {
	tests := []struct{ spec, want string }{
		{"", "unknown backend"},
		{"tpm0", "unknown backend"},
		{"swtpm", "want swtpm:HOST:PORT"},
		{"swtpm:unix:", "want swtpm:HOST:PORT"},
		{"swtpm:127.0.0.1:1", "connect to swtpm"},
		{"swtpm:unix:/nonexistent/sock", "connect to swtpm"},
		{"sim:notanumber", "seed"},
		{"device:/nonexistent/tpmrm0", "open TPM device"},
		{"device:/dev/null", "is this a TPM"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			_, err := Open(t.Context(), tc.spec)
			if err == nil {
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.spec) {
				t.Errorf("Open(%q) = %q, want it to contain %q and the spec", tc.spec, err, tc.want)
			}
		})
	}
}

// TestConcurrentExtend hammers one TPM from many goroutines (run with -race):
// with every goroutine extending the same digest the result is independent of
// the order, so any lost or torn command shows in the final value.
func TestConcurrentExtend(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			ctx := t.Context()
			const workers, per = 8, 25
			d := digest("same")
			start, err := tp.ReadPCRs(ctx, []int{23})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < per; i++ {
						if err := tp.Extend(ctx, 23, d); err != nil {
							errs <- err
							return
						}
						if _, err := tp.ReadPCRs(ctx, []int{0, 23, 9, 10, 11, 12, 13, 14, 15}); err != nil {
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
			want := start[0]
			for i := 0; i < workers*per; i++ {
				want = extendHash(want, d)
			}
			got, err := tp.ReadPCRs(ctx, []int{23})
			if err != nil {
				t.Fatal(err)
			}
			if got[0] != want {
				t.Errorf("PCR 23 = %x, want %x", got[0], want)
			}
		})
	}
}

func TestContextCanceled(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			ctx, cancel := context.WithCancel(t.Context())
			cancel()
			if err := tp.Extend(ctx, 23, digest("x")); !errors.Is(err, context.Canceled) {
				t.Errorf("Extend with canceled context = %v, want context.Canceled", err)
			}
		})
	}
}

func TestClosed(t *testing.T) {
	tp, err := Open(t.Context(), "sim")
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tp.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if err := tp.Extend(t.Context(), 23, digest("x")); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Extend after Close = %v", err)
	}
	// The simulator is free again.
	tp2 := openT(t, "sim")
	_ = tp2
}

func TestAKPEM(t *testing.T) {
	tp := openT(t, "sim")
	p, err := AKPEM(tp.AK())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(p, []byte("-----BEGIN PUBLIC KEY-----\n")) {
		t.Errorf("PEM = %q", p)
	}
	if _, err := AKPEM(nil); err == nil {
		t.Error("AKPEM(nil) succeeded")
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
