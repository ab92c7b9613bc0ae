package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// row is one line of the table.
type row struct {
	ID       string `json:"id"`
	Case     string `json:"case"`
	TPM      string `json:"tpm"`
	Value    string `json:"tpmmux"`
	Baseline string `json:"baseline"`
	Ratio    string `json:"ratio"`
	Target   string `json:"target"`
	Met      string `json:"met"`
	// Raw numbers for scripts: the value, the baseline and the ratio in
	// the row's unit.
	V     float64 `json:"v"`
	B     float64 `json:"b"`
	R     float64 `json:"r"`
	Notes string  `json:"notes,omitempty"`
}

func (e *env) add(r row) { e.rows = append(e.rows, r) }

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "NO"
}

func (e *env) printTable(w io.Writer, took time.Duration) {
	host, _ := os.Hostname()
	fmt.Fprintf(w, "tpmmux-bench: %s, %d CPUs (%s), %s; %d run(s) per figure (median), quick=%v; took %s\n",
		cpuModel(), runtime.NumCPU(), host, runtime.Version(), e.runs, e.quick, took.Round(time.Second))
	fmt.Fprintf(w, "fsync (4 KiB write + fdatasync) median %s; load average before/after: %s / %s\n\n", fmtDur(e.fsync), e.loadBefore, loadAvg())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tCASE\tTPM\tTPMMUX\tBASELINE\tRATIO\tTARGET\tMET")
	for _, r := range e.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, r.Case, r.TPM, r.Value, r.Baseline, r.Ratio, r.Target, r.Met)
	}
	tw.Flush()
	var notes []string
	for _, r := range e.rows {
		if r.Notes != "" {
			notes = append(notes, fmt.Sprintf("  %s %s %s: %s", r.ID, r.Case, r.TPM, r.Notes))
		}
	}
	if len(notes) > 0 {
		fmt.Fprintln(w, "\nnotes:")
		fmt.Fprintln(w, strings.Join(notes, "\n"))
	}
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
