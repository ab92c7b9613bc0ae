package mux_test

import (
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// BenchmarkBatchCommit is the multiplexer's cost per record without the
// wire: 100 VMs submit a full batch (8192 records, 82 per VM) at once, and
// the committer conceals it, makes it durable in one store transaction and
// extends it once on the simulator. ns/record is the figure to watch; with
// fsync it includes the store's durability, which dominates.
//
//	go test -run=XXX -bench=BatchCommit ./internal/mux
func BenchmarkBatchCommit(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("fsync=%v", sync), func(b *testing.B) {
			ctx := b.Context()
			tp, err := tpm.Open(ctx, "sim")
			if err != nil {
				b.Skipf("simulator busy: %v", err)
			}
			defer tp.Close()
			st, err := logstore.Open(filepath.Join(b.TempDir(), "log.db"), &logstore.Options{NoSync: !sync})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			m, err := mux.Open(ctx, tp, st, mux.Config{Host: "bench", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			const vms, perVM = 100, 82
			ids := make([]conceal.Digest, vms)
			for i := range ids {
				ident, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{byte(i), 0xbe}, Name: fmt.Sprintf("bench-%03d", i)})
				if err != nil {
					b.Fatal(err)
				}
				ids[i] = ident.ID()
			}
			recs := make([][]*record.Record, vms)
			for i := range recs {
				for j := range perVM {
					path := fmt.Sprintf("/usr/lib/x86_64-linux-gnu/lib%03d-%02d.so", i, j)
					d := sha256.Sum256([]byte(path))
					e := ima.NewIMANG(10, "sha256", d[:], path)
					recs[i] = append(recs[i], &record.Record{Kind: record.KindMeasurement, Time: int64(j), Measurement: &record.Measurement{
						PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
						TemplateData: e.TemplateData, LogIndex: uint64(j), BootID: "bench",
					}})
				}
			}
			tickets := make([]*mux.Ticket, vms)
			b.ReportAllocs()
			for b.Loop() {
				for i, id := range ids {
					if tickets[i], err = m.Submit(id, recs[i]...); err != nil {
						b.Fatal(err)
					}
				}
				for _, t := range tickets {
					if _, err := t.Wait(ctx); err != nil {
						b.Fatal(err)
					}
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*vms*perVM), "ns/record")
		})
	}
}
