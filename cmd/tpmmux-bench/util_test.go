package main

import (
	"os"
	"testing"
	"time"
)

// TestFmtDur: each unit's last value rounds up into the next unit, never
// to "1e+03" of the smaller one.
func TestFmtDur(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0"},
		{999 * time.Nanosecond, "999ns"},
		{1500 * time.Nanosecond, "1.5µs"},
		{999400 * time.Nanosecond, "999µs"},
		{999700 * time.Nanosecond, "1ms"},
		{3210 * time.Microsecond, "3.21ms"},
		{999700 * time.Microsecond, "1s"},
		{1500 * time.Millisecond, "1.5s"},
	} {
		if got := fmtDur(tc.d); got != tc.want {
			t.Errorf("fmtDur(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

// TestProcCPU: procCPU reads a live process's CPU time as cpuTime does
// (to the clock tick), so P7 can add swtpm's CPU to its guests'.
func TestProcCPU(t *testing.T) {
	start := cpuTime()
	for x := 0; cpuTime()-start < 300*time.Millisecond; x++ {
	}
	got, want := procCPU(os.Getpid()), cpuTime()
	if d := want - got; d < 0 || d > 50*time.Millisecond {
		t.Fatalf("procCPU %v, getrusage %v", got, want)
	}
	if procCPU(-1) != 0 {
		t.Fatal("procCPU of no process is not 0")
	}
}
