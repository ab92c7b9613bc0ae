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
		if haveSwtpm && (r.B <= 0 || r.R <= 0 || !strings.Contains(r.Baseline, "swtpm")) {
			t.Errorf("row %s: baseline %q (%v, ratio %v), want swtpm's", r.Case, r.Baseline, r.B, r.R)
		}
	}
}
