package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/daemon"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/vtpm/qemutpm"
)

// P8 is what a vTPM VM costs the bridge in memory (issue 16: at most
// 64 KiB a VM, against swtpm's 6.4 MiB): the bridge daemon's RSS delta
// over n vTPM domains, each prepared (identity, genesis, listeners),
// connected as QEMU connects, powered on and sent 20 IMA extends, divided
// by n. The daemon runs in a fresh process (a child of this program) and
// the QEMU side of every vTPM here, so the guests' connections are not
// counted. Baseline: swtpm as one VM's vTPM, driven the same way, its
// VmRSS.

// vtpmMemFacts is the child's report.
type vtpmMemFacts struct {
	N     int   `json:"n"`
	RSS0  int64 `json:"rss0"`
	RSS1  int64 `json:"rss1"`
	Anon0 int64 `json:"anon0"`
	Anon1 int64 `json:"anon1"`
}

// vtpmMemExtends is how many extends each vTPM gets before the
// measurement (a booted guest's firmware and first IMA entries).
const vtpmMemExtends = 20

// benchVTPMMemory runs P8.
func (e *env) benchVTPMMemory(ctx context.Context) error {
	n, nSw := 1000, 5
	if e.quick {
		n, nSw = 200, 2
	}
	var runs []vtpmMemFacts
	for r := 0; r < e.runs; r++ {
		f, err := e.vtpmMemChild(ctx, n)
		if err != nil {
			return err
		}
		runs = append(runs, *f)
		e.logf("  P8 bridge, %d vTPM VMs, run %d: RSS %s → %s (anon %s → %s): %s per VM", f.N, r+1,
			fmtBytes(float64(f.RSS0)), fmtBytes(float64(f.RSS1)), fmtBytes(float64(f.Anon0)), fmtBytes(float64(f.Anon1)),
			fmtBytes(float64(f.RSS1-f.RSS0)/float64(f.N)))
	}
	var per, perAnon []float64
	for _, f := range runs {
		per = append(per, float64(f.RSS1-f.RSS0)/float64(f.N))
		perAnon = append(perAnon, float64(f.Anon1-f.Anon0)/float64(f.N))
	}
	v, va := median(per), median(perAnon)
	r := row{ID: "P8", Case: fmt.Sprintf("memory per vTPM VM (%d VMs)", n), TPM: "sim", Value: fmtBytes(v) + " RSS", V: v,
		Target: "≤ 64 KiB", Met: yesNo(v <= 64<<10),
		Notes: fmt.Sprintf("the bridge daemon's RSS delta over %d idle vTPM domains (prepared, connected as QEMU connects, Startup and %d extends each, then idle over 1 s; QEMU's side in another process), after GC: anon %s/VM, the rest (%s/VM) the log store's file pages that bbolt has mapped, which grow with the records, not the VMs (P6)",
			n, vtpmMemExtends, fmtBytes(va), fmtBytes(v-va))}
	rss, anon, err := e.swtpmVTPMMemory(ctx, nSw)
	switch {
	case errors.Is(err, errNoSwtpm):
		r.Baseline, r.Ratio = "-", "-"
		r.Notes += "; no baseline: " + err.Error()
	case err != nil:
		return err
	default:
		r.B, r.R = rss, rss/v
		r.Baseline = fmtBytes(rss) + " (1 swtpm)"
		r.Ratio = fmtRatio(r.R)
		r.Notes += fmt.Sprintf("; swtpm: VmRSS of each of %d vTPM processes driven alike, median (RssAnon %s, %.0f× the bridge's anon per VM)", nSw, fmtBytes(anon), anon/va)
	}
	e.add(r)
	return nil
}

var errNoSwtpm = errors.New("swtpm not installed (scripts/setup.sh test)")

// swtpmVTPMMemory starts n swtpm vTPMs, drives each as benchVTPMMemory
// drives the bridge's, and returns the median VmRSS and RssAnon.
func (e *env) swtpmVTPMMemory(ctx context.Context, n int) (rss, anon float64, err error) {
	if swtpmproc.Available() != nil {
		return 0, 0, errNoSwtpm
	}
	dir, err := tempDir(e.work, "p8-swtpm-")
	if err != nil {
		return 0, 0, err
	}
	defer removeAll(dir)
	var rs, as []float64
	for i := range n {
		p, err := swtpmproc.StartVTPM(ctx, filepath.Join(dir, vmName(i)))
		if err != nil {
			return 0, 0, err
		}
		defer p.Stop()
		c, err := driveVTPM(ctx, p.CtrlPath(), i)
		if err != nil {
			return 0, 0, err
		}
		defer c.Close()
		mi, err := readMem(p.Pid())
		if err != nil {
			return 0, 0, err
		}
		rs, as = append(rs, float64(mi.RSS)), append(as, float64(mi.Anon))
	}
	return median(rs), median(as), nil
}

// driveVTPM connects to the vTPM at path as QEMU does and sends Startup
// and vtpmMemExtends extends; the connection stays open.
func driveVTPM(ctx context.Context, path string, vm int) (*qemutpm.Conn, error) {
	c, err := qemutpm.Dial(ctx, path)
	if err != nil {
		return nil, err
	}
	err = c.Startup(ctx)
	for k := 0; err == nil && k < vtpmMemExtends; k++ {
		err = c.Run(ctx, qemutpm.ExtendIMA(measurement(vm, k)))
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// vtpmMemChild runs the daemon side of P8 in a fresh process and plays
// QEMU for it: the child prints "drive FIRST COUNT DIR" when VMs FIRST…
// FIRST+COUNT-1 are prepared (their sockets in DIR), this process connects
// to them and answers "ok", and the child ends with its JSON report.
func (e *env) vtpmMemChild(ctx context.Context, n int) (*vtpmMemFacts, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, exe, "--child", "vtpm", "--child-n", strconv.Itoa(n), "--work", e.work)
	in, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	var conns []*qemutpm.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	fail := func(err error) (*vtpmMemFacts, error) {
		in.Close()
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("P8 child: %w (stderr: %s)", err, stderr.String())
	}
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "{") {
			var f vtpmMemFacts
			if err := json.Unmarshal([]byte(line), &f); err != nil {
				return fail(err)
			}
			in.Close()
			if err := cmd.Wait(); err != nil {
				return nil, fmt.Errorf("P8 child: %v (stderr: %s)", err, stderr.String())
			}
			return &f, nil
		}
		var first, count int
		var dir string
		if _, err := fmt.Sscanf(line, "drive %d %d %s", &first, &count, &dir); err != nil {
			return fail(fmt.Errorf("unexpected line %q", line))
		}
		for i := first; i < first+count; i++ {
			c, err := driveVTPM(cctx, vtpmSocket(dir, vmName(i)), i)
			if err != nil {
				return fail(err)
			}
			conns = append(conns, c)
		}
		if _, err := io.WriteString(in, "ok\n"); err != nil {
			return fail(err)
		}
	}
	return fail(fmt.Errorf("no report: %v", sc.Err()))
}

// childVTPM is the child's side of P8: the daemon with n vTPM domains,
// its RSS before (after one warm-up VM) and after.
func (e *env) childVTPM(ctx context.Context, n int, stdin io.Reader, stdout io.Writer) (*vtpmMemFacts, error) {
	rig, err := e.openRig(ctx, kindSim, func(c *daemon.Config) { c.VTPMMode = "durable" })
	if err != nil {
		return nil, err
	}
	defer rig.close()
	in := bufio.NewScanner(stdin)
	// drive has the parent connect to and power on VMs from first on.
	drive := func(first, count int) error {
		fmt.Fprintf(stdout, "drive %d %d %s\n", first, count, rig.vtpms)
		if !in.Scan() || in.Text() != "ok" {
			return fmt.Errorf("parent did not drive VMs %d-%d: %q %v", first, first+count-1, in.Text(), in.Err())
		}
		return nil
	}
	// One VM first, so one-time costs are not charged to the n.
	if err := rig.prepareAll(ctx, 1, true); err != nil {
		return nil, err
	}
	if err := drive(0, 1); err != nil {
		return nil, err
	}
	settle()
	m0, err := readMem(0)
	if err != nil {
		return nil, err
	}
	for done := 0; done < n; {
		k := min(100, n-done)
		if err := rig.prepareAll(ctx, k, true); err != nil {
			return nil, err
		}
		if err := drive(1+done, k); err != nil {
			return nil, err
		}
		done += k
	}
	// Idle for over a second, a vTPM gives its command buffers back
	// (internal/vtpm, bufIdle): the state of most VMs most of the time.
	time.Sleep(1500 * time.Millisecond)
	settle()
	m1, err := readMem(0)
	if err != nil {
		return nil, err
	}
	return &vtpmMemFacts{N: n, RSS0: m0.RSS, RSS1: m1.RSS, Anon0: m0.Anon, Anon1: m1.Anon}, nil
}
