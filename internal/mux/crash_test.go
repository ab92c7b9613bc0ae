package mux_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/bridge"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// The crash test of the write-ahead rule (docs/protocol.md, Group commit): a child process runs the bridge's ingest
// path (tpm.Open on a swtpm, logstore.Open, mux.Open, three VMs streaming
// measurements) and is killed with SIGKILL at random points; swtpm keeps
// running, as a hardware TPM outlives a crashed bridge. After the last kill
// the store must replay to the PCR, and every record the child reported as
// acknowledged must be durable exactly once, with no gap and no double.
const (
	// crashChildEnv carries the child's crashChildConfig (JSON). The child
	// test, TestCrashChild, does nothing without it.
	crashChildEnv = "TPMMUX_CRASH_CHILD"
	// crashKillsEnv overrides how many times the child is killed.
	crashKillsEnv = "TPMMUX_CRASH_KILLS"
	// crashSeedEnv fixes the seed of the kill schedule and submission sizes,
	// to replay a failing run (the test logs the seed it used).
	crashSeedEnv = "TPMMUX_CRASH_SEED"

	crashDefaultKills = 24
	crashMinDelay     = 20 * time.Millisecond
	crashMaxDelay     = 300 * time.Millisecond
	crashEarlyMax     = 40 * time.Millisecond
	// crashMaxSubmit is the largest submission a child VM makes.
	crashMaxSubmit = 8
	// crashInFlight is how many submissions each child VM keeps
	// outstanding, so kills land with records queued, being committed and
	// being extended.
	crashInFlight = 3

	crashUnextendedMsg = "batch was durable but not extended"
	crashUnbatchedMsg  = "records were durable but not batched"
)

// crashPoints are where a child kills itself (SIGKILL) at its After-th
// pass, besides the kills at random times: "wal-torn" in the middle of a
// write-ahead log group (half of it written, nothing synced: a torn tail),
// "wal-durable" after a group's write and fdatasync, before the committer
// learns of it (durable, never acknowledged), "apply" before batches go
// into bbolt (durable in the log only), "apply-mid" a few microseconds
// into the bbolt transaction, "wal-new-segment" before the first write
// into a new write-ahead log segment (a zero-filled one renamed into
// place, its header synced: segments are crashSegmentSize here, so that
// runs rotate).
var crashPoints = []string{"wal-torn", "wal-durable", "apply", "apply-mid", "wal-new-segment"}

// crashSegmentSize is the child's write-ahead log segment size.
const crashSegmentSize = 128 << 10

// crashVMNames are the child's VMs; their names are fixed so that a
// restarted child finds them again with Mux.Lookup.
var crashVMNames = []string{"crash-a", "crash-b", "crash-c"}

type crashChildConfig struct {
	Spec string `json:"spec"` // tpm.Open spec of the swtpm
	Dir  string `json:"dir"`  // state directory: log.db and <vm>.json
	Seed uint64 `json:"seed"`
	// Recover makes the child open, recover, report READY and exit
	// cleanly instead of ingesting until killed.
	Recover bool `json:"recover"`
	// Point and After: the child kills itself at crash point Point (one
	// of crashPoints) on its After-th pass there.
	Point string `json:"point,omitempty"`
	After int    `json:"after,omitempty"`
}

// crashSelfKill is the child's SIGKILL of itself, as a kill -9 from outside
// would land; it does not return.
func crashSelfKill(out *crashOut, point string) {
	out.printf("SELFKILL %s\n", point)
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {}
}

// crashHooks are the store options that kill the child at cfg's point.
func crashHooks(cfg crashChildConfig, out *crashOut) *logstore.Options {
	var mu sync.Mutex
	n := 0
	hit := func(point string) bool {
		mu.Lock()
		defer mu.Unlock()
		if cfg.Point != point {
			return false
		}
		n++
		return n == cfg.After
	}
	return &logstore.Options{
		WALSegmentSize: crashSegmentSize,
		WALBeforeWrite: func(f *os.File, off int64, b []byte) {
			switch {
			case off == int64(len("tpmmux-wal-v1\n\x00\x00")) && hit("wal-new-segment"):
				crashSelfKill(out, "wal-new-segment")
			case hit("wal-torn"):
				f.WriteAt(b[:len(b)/2], off)
				crashSelfKill(out, "wal-torn")
			case hit("wal-durable"):
				f.WriteAt(b, off)
				f.Sync()
				crashSelfKill(out, "wal-durable")
			}
		},
		ApplyHook: func(cs []*logstore.Commit) {
			switch {
			case hit("apply"):
				crashSelfKill(out, "apply")
			case hit("apply-mid"):
				go func() {
					time.Sleep(time.Duration(mrand.IntN(300)) * time.Microsecond)
					crashSelfKill(out, "apply-mid")
				}()
			}
		},
	}
}

// crashRecord is record j of VM vm (its measurement with guest log index
// j, which the mux numbers s = j: record 0 is genesis). Its content is a
// function of (vm, j) alone, so a record sent twice is the same record
// twice, and the check can tell a double from a gap.
func crashRecord(vm string, j uint64) *record.Record {
	d := sha256.Sum256(fmt.Appendf(nil, "tpmmux crash test %s %d", vm, j))
	e := ima.NewIMANG(10, "sha256", d[:], fmt.Sprintf("/crash/%s/%d", vm, j))
	return &record.Record{Kind: record.KindMeasurement, Time: int64(j), Measurement: &record.Measurement{
		PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
		TemplateData: e.TemplateData, LogIndex: j, BootID: "boot-" + vm,
	}}
}

func crashDomainXML(i int) []byte {
	var u [16]byte
	copy(u[:], "tpmmux-crash-vm")
	u[15] = byte(i)
	return fmt.Appendf(nil, `<domain type='kvm'>
  <name>%s</name>
  <uuid>%s</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><vsock model='virtio'><cid auto='no' address='%d'/></vsock></devices>
</domain>
`, crashVMNames[i], conceal.FormatUUID(u), 3+i)
}

func crashIdentityPath(dir, vm string) string { return filepath.Join(dir, vm+".json") }

// crashWriteFile writes path atomically (temporary file, fsync, rename).
func crashWriteFile(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func crashReadIdentity(path string) (*conceal.Identity, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var ident conceal.Identity
	if err := json.Unmarshal(b, &ident); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &ident, nil
}

// TestCrashChild is the bridge process of TestCrashKill9. Run on its own it
// is skipped.
func TestCrashChild(t *testing.T) {
	raw := os.Getenv(crashChildEnv)
	if raw == "" {
		t.Skip("the child process of TestCrashKill9; runs only when that test starts it")
	}
	var cfg crashChildConfig
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		t.Fatalf("%s: %v", crashChildEnv, err)
	}
	out := &crashOut{w: os.Stdout}
	if err := crashChild(cfg, out); err != nil {
		out.printf("ERROR %v\n", err)
		t.Fatal(err)
	}
}

// crashOut serializes whole lines onto the child's stdout; each line is one
// write(2) on an unbuffered file, so the parent sees it as soon as it is
// printed.
type crashOut struct {
	mu sync.Mutex
	w  io.Writer
}

func (o *crashOut) printf(format string, a ...any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.w.Write(fmt.Appendf(nil, format, a...))
}

func crashChild(cfg crashChildConfig, out *crashOut) error {
	ctx := context.Background()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	tp, err := tpm.Open(ctx, cfg.Spec)
	if err != nil {
		return err
	}
	defer tp.Close()
	st, err := logstore.Open(filepath.Join(cfg.Dir, "log.db"), crashHooks(cfg, out))
	if err != nil {
		return err
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, mux.Config{Host: "crash-test", Version: "test", Logger: log})
	if err != nil {
		return err
	}
	defer m.Close()
	if f := m.Status().Fault; f != "" {
		out.printf("FAULT %s\n", f)
		return fmt.Errorf("mux faulted after restart: %s", f)
	}
	br := &bridge.Bridge{Mux: m, Log: log}
	ids := make([]conceal.Digest, len(crashVMNames))
	for i, name := range crashVMNames {
		path := crashIdentityPath(cfg.Dir, name)
		id, ok := m.Lookup(name)
		if !ok {
			_, ident, err := br.Prepare(ctx, crashDomainXML(i))
			if err != nil {
				return err
			}
			b, _ := json.Marshal(ident)
			if err := crashWriteFile(path, b); err != nil {
				return err
			}
			out.printf("PREPARED %s\n", name)
			ids[i] = ident.ID()
			continue
		}
		// The child was killed between Prepare and writing the identity
		// file: the VM's owner gets it again from the bridge's store.
		if ident, err := crashReadIdentity(path); err != nil || ident.ID() != id {
			ident, err := m.Identity(id)
			if err != nil {
				return err
			}
			b, _ := json.Marshal(ident)
			if err := crashWriteFile(path, b); err != nil {
				return err
			}
			out.printf("IDENTITY-RESTORED %s\n", name)
		}
		ids[i] = id
	}
	// The agents' resume: the next record of each VM is the first one
	// that is not durable.
	next := make([]uint64, len(ids))
	var ready strings.Builder
	ready.WriteString("READY")
	for i, id := range ids {
		n, err := m.NextSeq(id)
		if err != nil {
			return err
		}
		next[i] = n
		fmt.Fprintf(&ready, " %s=%d", crashVMNames[i], n)
	}
	out.printf("%s\n", ready.String())
	if cfg.Recover {
		return nil
	}

	// Ingest until killed. Each VM keeps a few submissions in flight and
	// reports each acknowledgement as it completes, in order.
	errs := make(chan error, len(ids)+1)
	for i, id := range ids {
		go func() {
			errs <- crashIngest(ctx, m, id, crashVMNames[i], next[i], mrand.New(mrand.NewPCG(cfg.Seed, uint64(i))), out)
		}()
	}
	// Meanwhile quotes and VM churn, so kills also land during a quote,
	// a teardown (and its final quote) and a prepare.
	go func() { errs <- crashChurn(ctx, m, br, ids, out, mrand.New(mrand.NewPCG(cfg.Seed, 99))) }()
	return <-errs
}

// crashChurnName is the VM the child keeps tearing down and starting anew.
const crashChurnName = "crash-churn"

// crashChurn takes evidence of random VMs (a quote each) and every few
// rounds tears the churn VM down and prepares a new instance of it.
func crashChurn(ctx context.Context, m *mux.Mux, br *bridge.Bridge, ids []conceal.Digest, out *crashOut, rng *mrand.Rand) error {
	for round := 0; ; round++ {
		nonce := make([]byte, 16)
		rand.Read(nonce)
		if _, err := m.Evidence(ctx, ids[rng.IntN(len(ids))], nonce); err != nil {
			return fmt.Errorf("churn: evidence: %w", err)
		}
		out.printf("QUOTE\n")
		if round%3 != 2 {
			continue
		}
		if id, ok := m.Lookup(crashChurnName); ok {
			if _, err := m.Teardown(ctx, id, "destroyed"); err != nil {
				return fmt.Errorf("churn: teardown: %w", err)
			}
			out.printf("TORNDOWN %x\n", id)
		}
		_, ident, err := br.Prepare(ctx, crashChurnXML())
		if err != nil {
			return fmt.Errorf("churn: prepare: %w", err)
		}
		out.printf("CHURNED %x\n", ident.ID())
	}
}

func crashChurnXML() []byte {
	var u [16]byte
	copy(u[:], "tpmmux-crash-ch")
	return fmt.Appendf(nil, "<domain type='kvm'><name>%s</name><uuid>%s</uuid><os><type>hvm</type></os></domain>", crashChurnName, conceal.FormatUUID(u))
}

type crashSub struct {
	t    *mux.Ticket
	last uint64
}

func crashIngest(ctx context.Context, m *mux.Mux, id conceal.Digest, name string, j uint64, rng *mrand.Rand, out *crashOut) error {
	subs := make(chan crashSub, crashInFlight)
	done := make(chan error, 1)
	go func() {
		for s := range subs {
			if _, err := s.t.Wait(ctx); err != nil {
				done <- fmt.Errorf("%s: records up to %d: %w", name, s.last, err)
				return
			}
			out.printf("ACK %s %d\n", name, s.last)
		}
		done <- nil
	}()
	for {
		k := 1 + rng.Uint64N(crashMaxSubmit)
		recs := make([]*record.Record, k)
		for l := range recs {
			recs[l] = crashRecord(name, j+uint64(l))
		}
		t, err := m.Submit(id, recs...)
		if err != nil {
			close(subs)
			return fmt.Errorf("%s: submit from %d: %w", name, j, err)
		}
		select {
		case subs <- crashSub{t: t, last: j + k - 1}:
		case err := <-done:
			return err
		}
		j += k
	}
}

// crashRun is one life of the child process.
type crashRun struct {
	cmd    *exec.Cmd
	stderr bytes.Buffer
	ready  chan string // the READY line
	eof    chan struct{}

	mu    sync.Mutex
	lines []string // every stdout line
}

func startCrashChild(t *testing.T, cfg crashChildConfig) *crashRun {
	t.Helper()
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r := &crashRun{ready: make(chan string, 1), eof: make(chan struct{})}
	r.cmd = exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1", "-test.timeout=2m")
	r.cmd.Env = append(os.Environ(), crashChildEnv+"="+string(raw))
	r.cmd.Stderr = &r.stderr
	// Should this test die, its bridge children die with it.
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(r.eof)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			r.mu.Lock()
			r.lines = append(r.lines, line)
			r.mu.Unlock()
			if strings.HasPrefix(line, "READY") {
				r.ready <- line
			}
		}
		io.Copy(io.Discard, stdout)
	}()
	return r
}

// wait reaps the child after its stdout is drained.
func (r *crashRun) wait() (*os.ProcessState, error) {
	<-r.eof
	err := r.cmd.Wait()
	return r.cmd.ProcessState, err
}

func (r *crashRun) output() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	tail := r.lines[max(0, len(r.lines)-20):]
	return fmt.Sprintf("stdout (last lines):\n%s\nstderr:\n%s", strings.Join(tail, "\n"), r.stderr.String())
}

// TestCrashKill9 kills the bridge with SIGKILL at random points of ingest on
// a swtpm that keeps running, restarts it each time, and then checks that no
// acknowledged record was lost or doubled and that the store replays to the
// PCR.
func TestCrashKill9(t *testing.T) {
	if os.Getenv(crashChildEnv) != "" {
		t.Skip("inside the child process")
	}
	kills := crashDefaultKills
	if s := os.Getenv(crashKillsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive integer", crashKillsEnv, s)
		}
		kills = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv(crashSeedEnv); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", crashSeedEnv, s, err)
		}
		seed = n
	}
	t.Logf("seed %d (replay with %s=%d), %d kills", seed, crashSeedEnv, seed, kills)
	rng := mrand.New(mrand.NewPCG(seed, 0))

	sw := swtpmproc.StartTest(t)
	dir := t.TempDir()

	var (
		maxAck        = map[string]uint64{} // highest acknowledged log index per VM
		ackLines      int
		earlyKills    int // kills before the child reported READY (during start-up or recovery)
		unextended    int // restarts that found a durable batch not yet extended
		unbatched     int // restarts that found durable records not yet batched
		selfKills     = map[string]int{}
		unacked       uint64 // records a kill left durable but unacknowledged
		identRestored int
		prepared      = map[string]int{}
		quotes        int                 // evidence quotes the children completed
		tornDown      = map[string]bool{} // churn instances whose teardown was acknowledged
	)
	// absorb checks one run's output against what earlier runs
	// acknowledged and folds its acknowledgements in.
	absorb := func(i int, r *crashRun) {
		t.Helper()
		r.mu.Lock()
		lines := slices.Clone(r.lines)
		r.mu.Unlock()
		if strings.Contains(r.stderr.String(), crashUnextendedMsg) {
			unextended++
		}
		if strings.Contains(r.stderr.String(), crashUnbatchedMsg) {
			unbatched++
		}
		for _, line := range lines {
			f := strings.Fields(line)
			switch {
			case len(f) == 0:
			case f[0] == "READY":
				// The restart's resume point: nothing acknowledged
				// before may be missing from the store.
				for _, kv := range f[1:] {
					name, v, _ := strings.Cut(kv, "=")
					n, err := strconv.ParseUint(v, 10, 64)
					if err != nil {
						t.Fatalf("run %d: bad READY line %q", i, line)
					}
					if n == 0 || n-1 < maxAck[name] {
						t.Errorf("run %d: %s resumes at record %d, but record %d was acknowledged before: an acknowledged record was lost", i, name, n, maxAck[name])
					} else if i > 0 {
						unacked += n - 1 - maxAck[name]
					}
				}
			case f[0] == "ACK" && len(f) == 3:
				n, err := strconv.ParseUint(f[2], 10, 64)
				if err != nil {
					t.Fatalf("run %d: bad ACK line %q", i, line)
				}
				if n <= maxAck[f[1]] {
					t.Errorf("run %d: %s record %d acknowledged again (already acknowledged up to %d)", i, f[1], n, maxAck[f[1]])
				}
				maxAck[f[1]] = n
				ackLines++
			case f[0] == "PREPARED":
				prepared[f[1]]++
			case f[0] == "IDENTITY-RESTORED":
				identRestored++
			case f[0] == "QUOTE":
				quotes++
			case f[0] == "SELFKILL" && len(f) == 2:
				selfKills[f[1]]++
			case f[0] == "TORNDOWN" && len(f) == 2:
				tornDown[f[1]] = true
			case f[0] == "FAULT" || f[0] == "ERROR":
				t.Fatalf("run %d: child reported %q\n%s", i, line, r.output())
			}
		}
	}

	late := 0 // kills after start-up so far: every other one is at a crash point
	for i := 0; i < kills; i++ {
		cfg := crashChildConfig{Spec: sw.Spec(), Dir: dir, Seed: seed + uint64(i)}
		delay := crashMinDelay + time.Duration(rng.Int64N(int64(crashMaxDelay-crashMinDelay)))
		// The first kill and one in four of the others come within the
		// child's start-up (10-40 ms here), so they may land in tpm.Open,
		// recovery or VM preparation; the others land during ingest,
		// 20-300 ms after the child is ready. Half of those are the
		// child's own, at a crash point (write-ahead log, bbolt apply),
		// with the timed kill as a backstop.
		early := i == 0 || rng.IntN(4) == 0
		if !early {
			if late%2 == 1 {
				cfg.Point = crashPoints[(late/2)%len(crashPoints)]
				cfg.After = 1 + rng.IntN(60)
				if cfg.Point == "wal-new-segment" {
					// A rotation comes every crashSegmentSize of log,
					// not every group.
					cfg.After = 1 + cfg.After%4
				}
				delay = 4 * crashMaxDelay
			}
			late++
		}
		r := startCrashChild(t, cfg)
		if early {
			delay = time.Millisecond + time.Duration(rng.Int64N(int64(crashEarlyMax)))
		} else {
			select {
			case line := <-r.ready:
				r.ready <- line
			case <-r.eof:
			case <-time.After(30 * time.Second):
				r.cmd.Process.Kill()
				r.wait()
				t.Fatalf("run %d: child not ready after 30s\n%s", i, r.output())
			}
		}
		select {
		case <-time.After(delay):
		case <-r.eof: // killed itself at its crash point
		}
		killErr := r.cmd.Process.Signal(syscall.SIGKILL)
		ps, _ := r.wait()
		ws, ok := ps.Sys().(syscall.WaitStatus)
		if killErr != nil || !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("run %d: child ended on its own (%v) before the kill\n%s", i, ps, r.output())
		}
		select {
		case <-r.ready:
		default:
			earlyKills++
		}
		absorb(i, r)
		if t.Failed() {
			t.FailNow()
		}
	}

	// One more start lets recovery run to completion; the child exits
	// cleanly after reporting where each VM resumes.
	r := startCrashChild(t, crashChildConfig{Spec: sw.Spec(), Dir: dir, Seed: seed, Recover: true})
	if ps, err := r.wait(); err != nil || !ps.Success() {
		t.Fatalf("recovery run: %v\n%s", err, r.output())
	}
	absorb(kills, r)
	if t.Failed() {
		t.FailNow()
	}

	// The child is dead: the test is the TPM's one client now.
	ctx := t.Context()
	tp, err := tpm.Open(ctx, sw.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	st, err := logstore.Open(filepath.Join(dir, "log.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	// The store replays to the PCR, computed here from the stored batches
	// and independently of the mux's own recovery.
	replayed, batches := crashReplay(t, st)
	vals, err := tp.ReadPCRs(ctx, []int{mux.DefaultPCR})
	if err != nil {
		t.Fatal(err)
	}
	if vals[0] != replayed {
		t.Fatalf("PCR %d = %x, but the store's %d batches replay to %x", mux.DefaultPCR, vals[0], batches, replayed)
	}

	var logBuf bytes.Buffer
	m, err := mux.Open(ctx, tp, st, mux.Config{Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	status := m.Status()
	if status.Fault != "" {
		t.Fatalf("mux faulted after the crashes: %s", status.Fault)
	}
	if status.Epoch != 1 {
		t.Errorf("epoch %d after the crashes, want 1: swtpm kept running, so no new epoch may begin", status.Epoch)
	}
	if strings.Contains(logBuf.String(), crashUnextendedMsg) || strings.Contains(logBuf.String(), crashUnbatchedMsg) {
		t.Errorf("the recovery run finished recovery, yet the next Open still found an unextended batch or unbatched records:\n%s", logBuf.String())
	}
	infos, err := m.VMs()
	if err != nil {
		t.Fatal(err)
	}
	instances := map[string]int{}
	for _, vi := range infos {
		instances[vi.Name]++
		if vi.Ended && vi.Name != crashChurnName {
			t.Errorf("vm %s instance %x ended (%s): a restart prepared it again", vi.Name, vi.Instance, vi.EndedBy)
		}
	}

	var totalAcked, totalDurable, lost, doubled, gaps uint64
	for i, name := range crashVMNames {
		if instances[name] != 1 {
			t.Errorf("vm %s has %d instances in the store, want 1", name, instances[name])
		}
		ident, err := crashReadIdentity(crashIdentityPath(dir, name))
		if err != nil {
			t.Fatalf("identity of %s: %v", name, err)
		}
		id, ok := m.Lookup(name)
		if !ok {
			t.Fatalf("vm %s is not live after recovery", name)
		}
		if id != ident.ID() {
			t.Fatalf("vm %s: live instance %x, but its identity file is for %x", name, id[:8], ident.ID())
		}
		next, err := m.NextSeq(id)
		if err != nil {
			t.Fatal(err)
		}
		// Every durable record of the VM, in sequence order.
		seen := map[uint64]int{}
		var seqs uint64
		err = st.View(func(sn *logstore.Snapshot) error {
			return sn.Records(id, 0, func(lr *logstore.Record) error {
				if lr.Seq != seqs {
					return fmt.Errorf("record with seq %d where seq %d belongs", lr.Seq, seqs)
				}
				seqs++
				rec, err := record.Unmarshal(lr.R)
				if err != nil {
					return fmt.Errorf("record %d: %w", lr.Seq, err)
				}
				if lr.Seq == 0 {
					if rec.Kind != record.KindGenesis || rec.Genesis.Instance != ident.Instance {
						return fmt.Errorf("record 0 is not this instance's genesis: %v", rec.Kind)
					}
					return nil
				}
				if rec.Kind != record.KindMeasurement {
					return fmt.Errorf("record %d is a %v record", lr.Seq, rec.Kind)
				}
				j := rec.Measurement.LogIndex
				seen[j]++
				want, _ := crashRecord(name, j).Marshal()
				if !bytes.Equal(lr.R, want) {
					return fmt.Errorf("record %d (log index %d) does not hold record %d's content", lr.Seq, j, j)
				}
				return nil
			})
		})
		if err != nil {
			t.Fatalf("vm %s: %v", name, err)
		}
		if seqs != next {
			t.Errorf("vm %s: store holds %d records, its NextSeq says %d", name, seqs, next)
		}
		n := next - 1 // measurements
		for j, c := range seen {
			if c > 1 {
				doubled += uint64(c - 1)
				t.Errorf("vm %s: log index %d is durable %d times", name, j, c)
			}
			if j < 1 || j > n {
				t.Errorf("vm %s: log index %d outside 1..%d", name, j, n)
			}
		}
		for j := uint64(1); j <= n; j++ {
			if seen[j] == 0 {
				gaps++
				if j <= maxAck[name] {
					lost++
					t.Errorf("vm %s: acknowledged log index %d is not durable", name, j)
				} else {
					t.Errorf("vm %s: log index %d missing below %d", name, j, n)
				}
			}
		}
		for j := n + 1; j <= maxAck[name]; j++ {
			lost++
			t.Errorf("vm %s: acknowledged log index %d is not durable (durable up to %d)", name, j, n)
		}
		totalAcked += maxAck[name]
		totalDurable += n

		// Evidence for a fresh nonce verifies with the identity the
		// owner kept, and shows exactly the durable records.
		nonce := make([]byte, 32)
		rand.Read(nonce)
		ev, err := m.Evidence(ctx, id, nonce)
		if err != nil {
			t.Fatalf("vm %s: evidence: %v", name, err)
		}
		rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AK: tp.AK(), PCR: mux.DefaultPCR})
		if err != nil {
			t.Errorf("vm %s: evidence rejected: %v", name, err)
		} else if rep.Records != int(next) || rep.Counts.Measurements != int(n) {
			t.Errorf("vm %s: verifier saw %d records (%d measurements), store holds %d (%d)", name, rep.Records, rep.Counts.Measurements, next, n)
		}
		// And not with another VM's identity.
		other, err := crashReadIdentity(crashIdentityPath(dir, crashVMNames[(i+1)%len(crashVMNames)]))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: other, AK: tp.AK(), PCR: mux.DefaultPCR}); !verify.IsRejection(err) {
			t.Errorf("vm %s: evidence verified with another VM's identity (err %v)", name, err)
		}
	}
	// Churn instances: at most one is live; every ended one (a kill may have
	// come between its teardown and its final quote) has a final quote that
	// verifies post mortem and ends in its teardown; every teardown a child
	// acknowledged is among them.
	vms, err := m.VMs()
	if err != nil {
		t.Fatal(err)
	}
	live, ended := 0, 0
	for _, v := range vms {
		if v.Name != crashChurnName {
			continue
		}
		if !v.Ended {
			live++
			continue
		}
		ended++
		delete(tornDown, fmt.Sprintf("%x", v.ID))
		ident, err := m.Identity(v.ID)
		if err != nil {
			t.Fatalf("churn instance %x: %v", v.ID[:6], err)
		}
		fev, err := m.FinalEvidence(v.ID)
		if err != nil {
			t.Errorf("churn instance %x ended (%s) without a final quote: %v", v.ID[:6], v.EndedBy, err)
			continue
		}
		rep, err := verify.Verify(fev, verify.Options{PostMortem: true, Identity: ident, AK: tp.AK(), PCR: mux.DefaultPCR})
		if err != nil || !rep.Ended {
			t.Errorf("churn instance %x: post-mortem verification: %v", v.ID[:6], err)
		}
	}
	if live > 1 {
		t.Errorf("%d live churn instances, want at most 1", live)
	}
	for id := range tornDown {
		t.Errorf("churn instance %s: teardown acknowledged but not durable", id)
	}
	if quotes == 0 || ended == 0 {
		t.Errorf("the kills left no quote (%d) or teardown (%d) completed: nothing tested there", quotes, ended)
	}
	t.Logf("quotes completed %d; churn instances ended %d, each verified post mortem", quotes, ended)
	for name, c := range prepared {
		if c != 1 {
			t.Errorf("vm %s prepared %d times, want once", name, c)
		}
	}
	if totalAcked == 0 {
		t.Errorf("no record was acknowledged in %d runs: the kills came too early to test anything", kills)
	}
	t.Logf("kills %d (%d before the child was ready; at crash points: %v); ACK lines %d; records acknowledged %d, durable %d, lost %d, doubled %d, gaps %d; records a kill left durable but unacknowledged (found by the agents' resume, not resent): %d; restarts that found a durable batch not yet extended: %d, durable records not yet batched: %d; identity files restored from the store: %d; log: %d batches, %d entries",
		kills, earlyKills, selfKills, ackLines, totalAcked, totalDurable, lost, doubled, gaps, unacked, unextended, unbatched, identRestored, status.Batches, status.Entries)
	if kills >= crashDefaultKills {
		for _, p := range crashPoints {
			if selfKills[p] == 0 {
				t.Errorf("no kill landed at crash point %s", p)
			}
		}
	}
}

// crashReplay folds the current epoch's stored batches into the PCR value
// they extend to, as a verifier would, without the mux.
func crashReplay(t *testing.T, st *logstore.Store) (conceal.Digest, int) {
	t.Helper()
	info, ok, err := st.CurrentEpoch()
	if err != nil || !ok {
		t.Fatalf("current epoch: ok=%v err=%v", ok, err)
	}
	var pcr conceal.Digest
	var next uint64
	n := 0
	err = st.View(func(sn *logstore.Snapshot) error {
		return sn.Batches(info.Number, 0, func(index uint64, b *logstore.Batch) error {
			if index != uint64(n) || b.G0 != next {
				return fmt.Errorf("batch %d at g0 %d, want batch %d at %d", index, b.G0, n, next)
			}
			leaves := make([]conceal.Digest, 0, b.EntryCount()+1)
			if index == 0 {
				leaves = append(leaves, conceal.EpochLeaf(info.Record))
			}
			for i := range b.EntryCount() {
				var tg, c conceal.Digest
				copy(tg[:], b.Entries[i*conceal.EntrySize:])
				copy(c[:], b.Entries[i*conceal.EntrySize+32:])
				leaves = append(leaves, conceal.Leaf(tg, c))
			}
			if int(b.N) != len(leaves) {
				return errors.New("batch leaf count mismatch")
			}
			pcr = conceal.ExtendPCR(pcr, conceal.BatchDigest(b.G0, leaves))
			next += uint64(len(leaves))
			n++
			return nil
		})
	})
	if err != nil {
		t.Fatalf("replay: %v", err)
	}
	return pcr, n
}
