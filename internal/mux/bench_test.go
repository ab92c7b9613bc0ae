package mux_test

import (
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// BenchmarkIngest measures how many records per second the mux
// acknowledges (durable and extended) with group commit, against the seed's
// approach of one TPM extend per record, on the same TPM and store.
//
// Every VM is a closed-loop client: it submits one record and waits for its
// acknowledgement before the next, as a guest agent forwarding IMA entries
// one at a time does. b.N records are spread over the VMs.
//
//   - groupcommit: the mux as configured by default; while one batch is being
//     made durable and extended, the next fills with whatever the VMs sent.
//   - perrecord: the same mux with MaxBatch = 1, so every record costs one
//     durable store commit and one TPM2_PCR_Extend.
//
// fsync is the real store (every commit fsynced); nosync skips the fsync so
// the TPM's share of the cost is visible. The groupcommit/perrecord ratio of
// a row is read off two adjacent lines (records/s).
//
//	go test -run=XXX -bench=Ingest -benchtime=2000x ./internal/mux
func BenchmarkIngest(b *testing.B) {
	for _, backend := range []string{"sim", "swtpm"} {
		b.Run(backend, func(b *testing.B) {
			for _, dur := range []struct {
				name   string
				noSync bool
			}{{"fsync", false}, {"nosync", true}} {
				b.Run(dur.name, func(b *testing.B) {
					for _, vms := range []int{1, 10, 100} {
						b.Run(fmt.Sprintf("vms=%d", vms), func(b *testing.B) {
							for _, mode := range []struct {
								name     string
								maxBatch int
							}{{"groupcommit", 0}, {"perrecord", 1}} {
								b.Run(mode.name, func(b *testing.B) {
									benchIngest(b, backend, dur.noSync, vms, mode.maxBatch)
								})
							}
						})
					}
				})
			}
		})
	}
}

func benchIngest(b *testing.B, backend string, noSync bool, vms, maxBatch int) {
	ctx := b.Context()
	spec := backend
	if backend == "swtpm" {
		// A fresh swtpm per run: PCR 23 at its reset value, so the mux
		// starts a clean epoch (the in-process simulator is remanufactured
		// on every Open).
		p := swtpmproc.StartTest(b)
		spec = p.Spec()
	}
	tp, err := tpm.Open(ctx, spec)
	if err != nil {
		b.Fatal(err)
	}
	defer tp.Close()
	st, err := logstore.Open(filepath.Join(b.TempDir(), "log.db"), &logstore.Options{NoSync: noSync})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, mux.Config{
		MaxBatch: maxBatch,
		Host:     "bench",
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if f := m.Status().Fault; f != "" {
		b.Fatalf("mux faulted: %s", f)
	}
	ids := make([]conceal.Digest, vms)
	errs := make([]error, vms)
	var wg sync.WaitGroup
	for i := range ids {
		wg.Go(func() {
			var u [16]byte
			u[0], u[1] = byte(i>>8), byte(i)
			ident, err := m.NewVM(ctx, mux.Launch{UUID: u, Name: fmt.Sprintf("bench-%03d", i), CID: uint32(3 + i)})
			if err != nil {
				errs[i] = err
				return
			}
			ids[i] = ident.ID()
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	// One realistic ima-ng measurement, re-sent with a new log index.
	d := sha256.Sum256([]byte("bench"))
	e := ima.NewIMANG(10, "sha256", d[:], "/usr/bin/bench")
	before := m.Status().Stats

	b.ResetTimer()
	for i := range ids {
		n := b.N / vms
		if i < b.N%vms {
			n++
		}
		wg.Go(func() {
			for j := range n {
				r := &record.Record{Kind: record.KindMeasurement, Time: int64(j), Measurement: &record.Measurement{
					PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
					TemplateData: e.TemplateData, LogIndex: uint64(j + 1),
				}}
				if _, err := m.Append(ctx, ids[i], r); err != nil {
					errs[i] = err
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	for _, err := range errs {
		if err != nil {
			b.Fatal(err)
		}
	}
	after := m.Status().Stats
	batches := after.Batches - before.Batches
	extends := after.Extends - before.Extends
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
	if batches > 0 {
		b.ReportMetric(float64(after.Records-before.Records)/float64(batches), "records/batch")
	}
	if extends > 0 {
		b.ReportMetric(float64(after.ExtendNanos-before.ExtendNanos)/float64(extends)/1e3, "us/extend")
	}
}
