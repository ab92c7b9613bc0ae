package mux_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// TestCoverCost measures what cover leaves cost for a few pads and slots,
// against no cover in the same run: one live VM sends one record every
// 200 ms (within every envelope below) for TPMMUX_COVER_COST seconds, on a
// fsynced store. It prints log growth, extends/s, store growth, the
// record's ack latency and the evidence size; docs/performance.md has the
// table. Not run unless TPMMUX_COVER_COST is set.
func TestCoverCost(t *testing.T) {
	secs, _ := strconv.Atoi(os.Getenv("TPMMUX_COVER_COST"))
	if secs <= 0 {
		t.Skip("set TPMMUX_COVER_COST=seconds to measure")
	}
	dur := time.Duration(secs) * time.Second
	cases := []struct {
		name  string
		cover mux.Cover
	}{
		{"off", mux.Cover{}},
		{"P=8 T=250ms", mux.Cover{Pad: 8, Interval: 250 * time.Millisecond}},
		{"P=16 T=1s (default)", mux.Cover{Pad: 16, Interval: time.Second}},
		{"P=64 T=1s", mux.Cover{Pad: 64, Interval: time.Second}},
		{"P=16 T=100ms", mux.Cover{Pad: 16, Interval: 100 * time.Millisecond}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			tp, err := tpm.Open(ctx, "sim")
			if err != nil {
				t.Fatal(err)
			}
			defer tp.Close()
			path := filepath.Join(t.TempDir(), "log.db")
			st, err := logstore.Open(path, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			m, err := mux.Open(ctx, tp, st, mux.Config{Cover: c.cover})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			var a interface{ ID() [32]byte }
			slotted(t, m, func() error {
				ident, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x73}, Name: "vm-a"})
				a = ident
				return err
			})
			fi0, _ := os.Stat(path)
			s0 := m.Status()
			start := time.Now()
			var lat []time.Duration
			r := &record.Record{Kind: record.KindAction, Action: &record.Action{Action: "log", Detail: "trickle"}}
			for time.Since(start) < dur {
				t0 := time.Now()
				if _, err := m.Append(ctx, a.ID(), r); err != nil {
					t.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
				time.Sleep(max(0, 200*time.Millisecond-time.Since(t0)))
			}
			el := time.Since(start).Seconds()
			s1 := m.Status()
			fi1, _ := os.Stat(path)
			ev, err := m.Evidence(ctx, a.ID(), []byte("n"))
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := ev.MarshalBinary()
			slices.Sort(lat)
			t.Logf("%-20s records %.1f/s; extends %.2f/s; log +%.0f entries/s = %.1f KiB/s (%.0f MiB/day); store +%.1f KiB/s; ack p50 %v p99 %v; evidence %d KiB for %d entries",
				c.name, float64(len(lat))/el, float64(s1.Batches-s0.Batches)/el, float64(s1.Entries-s0.Entries)/el,
				float64(s1.Entries-s0.Entries)*64/el/1024, float64(s1.Entries-s0.Entries)*64/el*86400/(1<<20),
				float64(fi1.Size()-fi0.Size())/el/1024, lat[len(lat)/2].Round(100*time.Microsecond), lat[len(lat)*99/100].Round(100*time.Microsecond),
				len(raw)/1024, s1.Entries)
		})
	}
}
