package verify_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// BenchmarkVerify is the verifier's replay: decode and verify the evidence
// of one VM holding 1% of a log of n records (100 VMs), in full and as the
// delta of 1000 new records after a checkpoint. cmd/tpmmux-bench (P4) runs
// the same at up to 1M records; this keeps the hot path in go test.
//
//	go test -run=XXX -bench=Verify ./internal/verify
func BenchmarkVerify(b *testing.B) {
	for _, n := range []int{10_000, 100_000} {
		b.Run(fmt.Sprintf("records=%d", n), func(b *testing.B) {
			ctx := b.Context()
			tp, err := tpm.Open(ctx, "sim")
			if err != nil {
				b.Skipf("simulator busy (run benchmarks without the tests: -run=XXX): %v", err)
			}
			defer tp.Close()
			st, err := logstore.Open(filepath.Join(b.TempDir(), "log.db"), &logstore.Options{NoSync: true})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			m, err := mux.Open(ctx, tp, st, mux.Config{Host: "bench", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			const vms = 100
			idents := make([]*conceal.Identity, vms)
			next := make([]int, vms)
			for i := range idents {
				if idents[i], err = m.NewVM(ctx, mux.Launch{UUID: [16]byte{byte(i), 0xbe}, Name: fmt.Sprintf("bench-%03d", i)}); err != nil {
					b.Fatal(err)
				}
			}
			add := func(vm, count int) {
				for count > 0 {
					k := min(count, 1024)
					recs := make([]*record.Record, k)
					for j := range recs {
						recs[j] = benchRecord(next[vm])
						next[vm]++
					}
					t, err := m.Submit(idents[vm].ID(), recs...)
					if err != nil {
						b.Fatal(err)
					}
					if _, err := t.Wait(ctx); err != nil {
						b.Fatal(err)
					}
					count -= k
				}
			}
			for i := range vms {
				add(i, n/vms)
			}
			test := idents[0]
			opts := verify.Options{Nonce: []byte("full verification nonce"), Identity: test, AK: tp.AK(), PCR: mux.DefaultPCR}
			full := encode(b, m, test.ID(), opts.Nonce, nil)
			rep := mustVerify(b, full, opts)
			add(0, 1000)
			incOpts := verify.Options{Nonce: []byte("incremental verification nonce"), Identity: test, AK: tp.AK(), PCR: mux.DefaultPCR, Checkpoint: rep.Checkpoint}
			delta := encode(b, m, test.ID(), incOpts.Nonce, rep.Checkpoint.Since())
			b.Run("full", func(b *testing.B) {
				b.SetBytes(int64(len(full)))
				for b.Loop() {
					mustVerify(b, full, opts)
				}
			})
			b.Run("incremental-1k", func(b *testing.B) {
				b.SetBytes(int64(len(delta)))
				for b.Loop() {
					mustVerify(b, delta, incOpts)
				}
			})
		})
	}
}

func benchRecord(i int) *record.Record {
	path := fmt.Sprintf("/usr/lib/x86_64-linux-gnu/lib%06d.so", i)
	d := sha256.Sum256([]byte(path))
	e := ima.NewIMANG(10, "sha256", d[:], path)
	return &record.Record{Kind: record.KindMeasurement, Time: int64(i), Measurement: &record.Measurement{
		PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
		TemplateData: e.TemplateData, LogIndex: uint64(i), BootID: "bench",
	}}
}

func encode(b *testing.B, m *mux.Mux, id conceal.Digest, nonce []byte, since *evidence.Since) []byte {
	ev, err := m.EvidenceSince(context.Background(), id, nonce, since)
	if err != nil {
		b.Fatal(err)
	}
	raw, err := ev.MarshalBinary()
	if err != nil {
		b.Fatal(err)
	}
	return raw
}

func mustVerify(b *testing.B, raw []byte, opts verify.Options) *verify.Report {
	ev, err := evidence.Decode(raw)
	if err != nil {
		b.Fatal(err)
	}
	rep, err := verify.Verify(ev, opts)
	if err != nil {
		b.Fatal(err)
	}
	return rep
}
