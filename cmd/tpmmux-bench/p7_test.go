package main

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// TestVTPMLatencyRows runs P7 small (the simulator, one run, 1 and 3 VMs):
// every guest extend through the bridge daemon's vTPM must succeed (a
// failed TPM command fails the run), and each mode and size gets a row
// whose p50 and p99 are real latencies, with swtpm's beside it when swtpm
// is installed.
func TestVTPMLatencyRows(t *testing.T) {
	if testing.Short() {
		t.Skip("starts bridge daemons and swtpm processes")
	}
	e := &env{work: t.TempDir(), runs: 1, quick: true, dur: 20 * time.Millisecond, tpms: []string{kindSim}, vtpmVMs: []int{1, 3}, vtpmMin: 50, log: io.Discard}
	if err := e.benchVTPM(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(e.rows) != 4 {
		t.Fatalf("%d rows, want 4 (2 modes × 2 sizes)", len(e.rows))
	}
	haveSwtpm := swtpmproc.Available() == nil
	for _, r := range e.rows {
		p50, p99, ok := strings.Cut(strings.TrimSpace(r.Value), " / ")
		if r.ID != "P7" || !ok || p50 == "" || p99 == "" || r.V <= 0 {
			t.Errorf("row %+v: want P7 with p50 / p99 and a positive p99", r)
		}
		if r.Met != "yes" && r.Met != "NO" {
			t.Errorf("row %s: met %q", r.Case, r.Met)
		}
		if !strings.Contains(r.Notes, "the disk alone at the runs' pace") {
			t.Errorf("row %s: no paced-disk note: %s", r.Case, r.Notes)
		}
		if haveSwtpm && (r.B <= 0 || r.R <= 0 || !strings.Contains(r.Baseline, "swtpm")) {
			t.Errorf("row %s: baseline %q (%v, ratio %v), want swtpm's", r.Case, r.Baseline, r.B, r.R)
		}
	}
}

// TestP7Target pins P7's target formulas and their names
// (docs/performance.md, Targets).
func TestP7Target(t *testing.T) {
	ext, fs := 3*time.Millisecond, 200*time.Microsecond
	for _, c := range []struct {
		mode string
		n    int
		want time.Duration
		name string
	}{
		{"durable", 1, 1200 * time.Microsecond, "fsync + 1ms"},
		{"durable", 100, 1200 * time.Microsecond, "fsync + 1ms"},
		{"anchored", 1, 4200 * time.Microsecond, "extend + fsync + 1ms"},
		{"anchored", 10, 6400 * time.Microsecond, "2 × (extend + fsync)"},
	} {
		f, name := p7Target(c.mode, c.n, ext)
		if got := f(fs); got != c.want || name != c.name {
			t.Errorf("%s, %d VMs: target %v (%s), want %v (%s)", c.mode, c.n, got, name, c.want, c.name)
		}
	}
}

// TestPacedFsync: the paced disk probe writes at least 200 times within
// its budget, keeps the gap, and returns the times sorted.
func TestPacedFsync(t *testing.T) {
	gap := time.Millisecond
	start := time.Now()
	ds, err := pacedFsync(t.TempDir(), gap, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 200 {
		t.Fatalf("%d writes, want 200 (the minimum; the budget is shorter)", len(ds))
	}
	if took := time.Since(start); took < 200*gap {
		t.Errorf("took %v for 200 writes %v apart", took, gap)
	}
	for i := 1; i < len(ds); i++ {
		if ds[i] < ds[i-1] || ds[0] <= 0 {
			t.Fatalf("times not sorted or not positive at %d: %v %v", i, ds[i-1], ds[i])
		}
	}
}
