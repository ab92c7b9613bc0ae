// Command tpmmux-bench measures tpmmux against the approaches it replaces
// and prints one table: every figure is the median of several runs, beside
// its baseline measured in the same invocation, and their ratio.
//
//	go run ./cmd/tpmmux-bench [--quick] [--tpm sim,swtpm,hw] [--only P1,P3] [--profile DIR]
//
// The experiments (docs/performance.md describes them and the results):
//
//	P1  ingest records/s through the whole pipeline (guest frames over unix
//	    socket pairs, bridge.Serve, conceal, durable with fsync, extended)
//	    for 1, 10, 100 and 1000 streaming VMs, against one extend per record
//	P2  ack latency p50/p99 of the same runs
//	P3  attestation requests/s for 1..1000 concurrent verifiers, batched
//	    quotes against one quote per request; sampled responses verified
//	P4  verifier time and evidence bytes for logs of 10k, 100k and 1M
//	    records, full and incremental (checkpoint plus 1k new records)
//	P5  provisioning time and memory per VM: bridge.Prepare plus a listener,
//	    against swtpm_setup plus one swtpm process per VM
//	P6  bridge RSS with 1000 VMs and 1M records
//	P7  guest-visible vTPM extend latency p50/p99 (modes durable and
//	    anchored, 1, 10, 100 VMs) from QEMU's side of the data socket,
//	    against swtpm as each VM's vTPM
//	P8  memory per vTPM VM: the bridge's RSS over 1000 powered-on vTPM
//	    domains, against one swtpm vTPM process
//	P9  guest boot to IMA-ready: the bridge's vTPM against swtpm per VM and no TPM (QEMU TCG; skipped without QEMU)
//
// TPMs: "sim" (in-process simulator), "swtpm" (a swtpm process, started
// fresh per run), "hw" (the simulator served at a discrete TPM's speed:
// internal/tpm/hwprofile).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// env is one benchmark invocation's settings and shared inputs.
type env struct {
	quick    bool
	runs     int
	tpms     []string
	only     map[string]bool
	work     string // scratch directory on the disk under test
	profile  string // directory for CPU profiles, or ""
	vmsList  []int
	vtpmVMs  []int // P7: VM counts
	vtpmMin  int   // P7: least extends measured a run (0: 2000, --quick 500)
	verList  []int
	evModes  []string // P3: "full", "incremental"
	early    bool     // P3: verifiers ask for early evidence
	p4Sizes  []int
	frame    int
	dur      time.Duration // --dur: overrides the measurement window
	maxBatch int           // --max-batch: MaxBatch of the group-commit runs
	log      io.Writer

	pool   *pool
	frames *frames
	fsync  time.Duration // median write+fdatasync in work
	swtpm  *swtpmFacts   // measured in P5, used by P6's baseline
	rows   []row

	loadBefore string
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bench",
		Synopsis: []string{"[--quick] [--tpm LIST] [--only LIST] [flags]"},
		Summary:  "measure tpmmux's performance figures (P1…) against their baselines",
		Description: `Prints the table of figures P1, P2, …, each with the baseline measured in the same run and their
ratio; docs/performance.md explains the method. scripts/bench.sh runs it.`,
	}
	fs := cmd.FlagSet()
	quick := fs.Bool("quick", false, "fewer runs and smaller sizes (about 2 minutes)")
	tpms := fs.String("tpm", "sim,swtpm,hw", "TPMs to run on: sim, swtpm, hw (the simulator at hardware speed)")
	only := fs.String("only", "", "run only these experiments (e.g. P1,P3); P2 comes with P1")
	runs := fs.Int("runs", 0, "runs per figure (default 3, --quick 1)")
	work := fs.String("work", "", "scratch directory on the disk to measure (default: a new directory under $TMPDIR)")
	profile := fs.String("profile", "", "write a CPU profile per experiment (cpu-P1.pprof …) and an allocation profile into this directory")
	frame := fs.Int("frame", 64, "IMA entries per measurement frame in P1 (0: as the agent packs a backlog, up to 60 KiB)")
	vmsFlag := fs.String("vms", "1,10,100,1000", "VM counts for P1 and P2")
	vtpmFlag := fs.String("vtpm-vms", "1,10,100", "VM counts for P7 (vTPM guests extending at once)")
	verFlag := fs.String("verifiers", "1,10,100,1000", "concurrent verifier counts for P3")
	evFlag := fs.String("evidence", "full,incremental", "P3's verifiers ask for full evidence, incremental evidence (from a checkpoint), or both")
	early := fs.Bool("early", true, "P3's verifiers ask for early evidence: the log and the VM's fields while the quote is taken (docs/protocol.md, Early evidence)")
	maxBatch := fs.Int("max-batch", 0, "the group-commit runs' mux.Config.MaxBatch (default: the multiplexer's, 8192)")
	durFlag := fs.Duration("dur", 0, "measurement window of each P1/P2/P3 run (default 1s, P3 on hw 3s; --quick halves them)")
	jsonOut := fs.String("json", "", "also write the table as JSON to this file")
	child := fs.String("child", "", "internal: run a memory measurement in a fresh process")
	childN := fs.Int("child-n", 0, "internal: size for --child")
	childM := fs.Int("child-m", 0, "internal: second size for --child")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *child != "" {
		return childMain(ctx, *child, *childN, *childM, *work, stdout, stderr)
	}
	e := &env{evModes: strings.Split(*evFlag, ","), early: *early, maxBatch: *maxBatch, dur: *durFlag, quick: *quick, runs: *runs, profile: *profile, frame: *frame, log: stderr, only: map[string]bool{}}
	if e.runs <= 0 {
		e.runs = 3
		if e.quick {
			e.runs = 1
		}
	}
	for _, t := range strings.Split(*tpms, ",") {
		t = strings.TrimSpace(t)
		switch t {
		case "":
		case kindSim, kindSwtpm, kindHW:
			e.tpms = append(e.tpms, t)
		default:
			fmt.Fprintf(stderr, "tpmmux-bench: unknown TPM %q (want sim, swtpm, hw)\n", t)
			return 2
		}
	}
	for _, p := range strings.Split(*only, ",") {
		if p = strings.ToUpper(strings.TrimSpace(p)); p != "" {
			e.only[p] = true
		}
	}
	if e.only["P2"] {
		e.only["P1"] = true
	}
	if slices.Contains(e.tpms, kindSwtpm) {
		if err := swtpmproc.Available(); err != nil {
			fmt.Fprintf(stderr, "tpmmux-bench: %v; skipping the swtpm rows (scripts/bench.sh installs it)\n", err)
			e.tpms = slices.DeleteFunc(e.tpms, func(s string) bool { return s == kindSwtpm })
		}
	}
	var err error
	if e.vmsList, err = intList(*vmsFlag); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bench: --vms: %v\n", err)
		return 2
	}
	if e.vtpmVMs, err = intList(*vtpmFlag); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bench: --vtpm-vms: %v\n", err)
		return 2
	}
	if e.verList, err = intList(*verFlag); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bench: --verifiers: %v\n", err)
		return 2
	}
	e.p4Sizes = []int{10_000, 100_000, 1_000_000}
	if e.quick {
		e.p4Sizes = []int{10_000, 100_000}
	}
	if *work == "" {
		d, err := os.MkdirTemp("", "tpmmux-bench-")
		if err != nil {
			fmt.Fprintf(stderr, "tpmmux-bench: %v\n", err)
			return 1
		}
		defer os.RemoveAll(d)
		e.work = d
	} else {
		if err := os.MkdirAll(*work, 0o700); err != nil {
			fmt.Fprintf(stderr, "tpmmux-bench: %v\n", err)
			return 1
		}
		e.work = *work
	}
	if e.profile != "" {
		if err := os.MkdirAll(e.profile, 0o755); err != nil {
			fmt.Fprintf(stderr, "tpmmux-bench: %v\n", err)
			return 1
		}
	}
	start := time.Now()
	e.loadBefore = loadAvg()
	if err := e.bench(ctx); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bench: %v\n", err)
		return 1
	}
	e.printTable(stdout, time.Since(start))
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(e.rows, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintf(stderr, "tpmmux-bench: %v\n", err)
			return 1
		}
	}
	if e.profile != "" {
		f, err := os.Create(filepath.Join(e.profile, "allocs.pprof"))
		if err == nil {
			pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
	}
	return 0
}

func (e *env) want(p string) bool { return len(e.only) == 0 || e.only[p] }

func (e *env) logf(format string, a ...any) {
	fmt.Fprintf(e.log, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, a...))
}

// section runs one experiment, under a CPU profile when asked.
func (e *env) section(ctx context.Context, name string, fn func(context.Context) error) error {
	if !e.want(name) {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	e.logf("%s …", name)
	if e.profile != "" {
		f, err := os.Create(filepath.Join(e.profile, "cpu-"+name+".pprof"))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	t := time.Now()
	err := fn(ctx)
	e.logf("%s done in %s", name, time.Since(t).Round(time.Millisecond))
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

func (e *env) bench(ctx context.Context) error {
	e.logf("tpmmux-bench: quick=%v runs=%d tpms=%v work=%s (%d CPUs, %s)", e.quick, e.runs, e.tpms, e.work, runtime.NumCPU(), runtime.Version())
	var err error
	if e.pool, err = newPool(1024); err != nil {
		return err
	}
	if e.frames, err = e.pool.frames(e.frame); err != nil {
		return err
	}
	if e.fsync, err = fsyncLatency(e.work, 50); err != nil {
		return err
	}
	e.logf("fsync (4 KiB write + fdatasync) median %s", fmtDur(e.fsync))
	for _, s := range []struct {
		name string
		fn   func(context.Context) error
	}{
		{"P1", e.benchIngest},
		{"P3", e.benchAttest},
		{"P4", e.benchVerifier},
		{"P5", e.benchProvision},
		{"P6", e.benchScale},
		{"P7", e.benchVTPM},
		{"P8", e.benchVTPMMemory},
		{"P9", e.benchBoot},
	} {
		if err := e.section(ctx, s.name, s.fn); err != nil {
			return err
		}
	}
	return nil
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 100000 {
			return nil, fmt.Errorf("%q is not a count from 1 to 100000", f)
		}
		out = append(out, n)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no counts")
	}
	return out, nil
}
