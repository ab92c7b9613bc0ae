package logstore

import (
	"bytes"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/fxamacker/cbor/v2"
	"github.com/tpmmux/tpmmux/internal/conceal"
)

// BenchmarkCommit is the log store's share of one group commit: a batch of
// n records of 100 VMs in one transaction, with and without fsync (ns per
// record in ns/record).
func BenchmarkCommit(b *testing.B) {
	for _, sync := range []bool{false, true} {
		for _, n := range []int{1, 64, 8192} {
			name := fmt.Sprintf("records=%d/fsync=%v", n, sync)
			b.Run(name, func(b *testing.B) {
				s, err := Open(filepath.Join(b.TempDir(), "log.db"), &Options{NoSync: !sync})
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				const vms = 100
				r := make([]byte, 260) // a measurement record's size
				var seq [vms]uint64
				var g uint64
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					c := &Commit{Epoch: 1, Index: uint64(i), Batch: Batch{G0: g, N: uint32(n), Entries: make([]byte, n*conceal.EntrySize)}}
					c.Records = make([]Put, n)
					for j := range c.Records {
						v := (j / 64) % vms // frames of 64 records of one VM
						c.Records[j] = Put{ID: [32]byte{byte(v)}, Record: Record{Seq: seq[v], G: g, Batch: uint64(i), R: r}}
						seq[v]++
						g++
					}
					for v := range min(n, vms) {
						c.VMs = append(c.VMs, VM{ID: [32]byte{byte(v)}, Name: fmt.Sprintf("vm-%d", v), NextSeq: seq[v]})
					}
					if err := s.Commit(c); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/record")
			})
		}
	}
}

// TestAppendRecordMatchesCBOR pins the hand-written record encoding of the
// commit path to what cbor.Marshal writes (and the decoder reads).
func TestAppendRecordMatchesCBOR(t *testing.T) {
	vals := []uint64{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<32 - 1, 1 << 32, 1<<64 - 1}
	rs := [][]byte{nil, {}, {1}, make([]byte, 23), make([]byte, 24), make([]byte, 300), make([]byte, 70000)}
	for i, v := range vals {
		for j, r := range rs {
			rec := Record{Seq: v, G: vals[(i+1)%len(vals)], Batch: vals[(i+j)%len(vals)], R: r}
			want, err := cbor.Marshal(&rec)
			if err != nil {
				t.Fatal(err)
			}
			got := appendRecord([]byte{0xff}, &rec)[1:]
			if !bytes.Equal(got, want) {
				t.Fatalf("record %+v: appendRecord %x, cbor.Marshal %x", rec, got[:min(len(got), 40)], want[:min(len(want), 40)])
			}
			if len(got) > recordSize(&rec) {
				t.Fatalf("record of %d bytes exceeds recordSize %d", len(got), recordSize(&rec))
			}
			var back Record
			if err := cbor.Unmarshal(got, &back); err != nil || back.Seq != rec.Seq || back.G != rec.G || back.Batch != rec.Batch || !bytes.Equal(back.R, rec.R) {
				t.Fatalf("decode %+v: %v", back, err)
			}
		}
	}
}
