package vtpm_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/qemutpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// BenchmarkExtendLatency is the guest-visible latency of one PCR_Extend
// (sha1 + sha256 digests, as Linux IMA sends on a two-bank TPM) through a
// data socket, as QEMU's TPM backend sends it: the bridge's vTPM with the
// in-memory journal, the same with a FileInflight record, and swtpm as a
// per-VM vTPM (the baseline: same machine, same data-socket path via
// CMD_SET_DATAFD). Each iteration sends one extend to each in turn, so a
// change in the machine's load hits all three alike. It reports p50 and
// p99 of each and the p50 ratios to swtpm.
//
//	go test -run '^$' -bench ExtendLatency -benchtime 5000x ./internal/vtpm/
func BenchmarkExtendLatency(b *testing.B) {
	mem := newRig(b, nil, nil)
	mem.powerOn(b)

	f, err := os.CreateTemp(b.TempDir(), "inflight")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fi, err := vtpm.NewFileInflight(f)
	if err != nil {
		b.Fatal(err)
	}
	v, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}, Logger: quietLog(), Inflight: fi}, nil)
	if err != nil {
		b.Fatal(err)
	}
	infClient, infServer := socketPair(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go v.ServeData(ctx, infServer)
	v.Init(ctx)
	respRC(b, infClient, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0})

	sw, _ := startSwtpm(b)
	targets := []struct {
		name string
		c    net.Conn
	}{{"vtpm", mem.raw}, {"vtpm-inflight", infClient}, {"swtpm", sw}}
	cmds := make([][]byte, 64)
	for i := range cmds {
		cmds[i] = twoBankExtend(i)
	}
	lat := make([][]time.Duration, len(targets))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k, tg := range targets {
			t := time.Now()
			if rc := respRC(b, tg.c, cmds[i%len(cmds)]); rc != 0 {
				b.Fatalf("%s PCR_Extend: rc %#x", tg.name, rc)
			}
			lat[k] = append(lat[k], time.Since(t))
		}
	}
	b.StopTimer()
	p50 := make([]float64, len(targets))
	for k, tg := range targets {
		slices.Sort(lat[k])
		p50[k] = float64(lat[k][len(lat[k])/2].Nanoseconds()) / 1e3
		b.ReportMetric(p50[k], tg.name+"-p50-µs")
		b.ReportMetric(float64(lat[k][len(lat[k])*99/100].Nanoseconds())/1e3, tg.name+"-p99-µs")
	}
	b.ReportMetric(p50[0]/p50[2], "vtpm/swtpm-p50")
	b.ReportMetric(p50[1]/p50[2], "vtpm-inflight/swtpm-p50")
}

// twoBankExtend is a PCR_Extend of PCR 10 with a sha1 and a sha256 digest.
func twoBankExtend(i int) []byte {
	return qemutpm.ExtendIMA(sha256.Sum256([]byte(strconv.Itoa(i))))
}

// startSwtpm runs swtpm as QEMU's per-VM vTPM (swtpmproc.StartVTPM),
// connects to it as QEMU does (qemutpm.Dial), sends TPM2_Startup and
// returns the data socket and swtpm's pid.
func startSwtpm(b testing.TB) (net.Conn, int) {
	b.Helper()
	swtpmproc.Need(b)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := swtpmproc.StartVTPM(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Stop() })
	c, err := qemutpm.Dial(ctx, p.CtrlPath())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	if err := c.Startup(ctx); err != nil {
		b.Fatalf("swtpm: %v", err)
	}
	return c.DataConn(), p.Pid()
}

// procStatus returns a size field ("VmRSS", "RssAnon") of a process's
// /proc status in bytes.
func procStatus(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no %s for pid %d", field, pid)
}

// TestPerVTPMMemory measures what one served vTPM costs the bridge: the
// heap and goroutine stacks of n vTPMs, each powered on, started, with 20
// extends journaled elsewhere and its control and data connections served
// (StartControl, with a Parker as the bridge has), divided by n, right
// after the extends and again once idle (the command buffers given back,
// the channels parked with no goroutine). Target: at most 64 KiB. It logs swtpm's RSS for the same job (the per-VM baseline);
// tpmmux-bench P8 measures the whole bridge's RSS per vTPM VM.
func TestPerVTPMMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates a few hundred vTPMs")
	}
	const n = 200
	mem := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc + m.StackInuse
	}
	// Journals are the multiplexer's memory, not the vTPM's: share one
	// that forgets.
	j := forgetJournal{}
	p, err := vtpm.NewParker()
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	before := mem()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var keep []any
	for i := range n {
		v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Parker: p}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctrlA, ctrlB := unixPair(t)
		v.StartControl(ctx, ctrlB, func(error) {})
		fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		ctrlCall(t, ctrlA, 16, nil, []int{fds[1]}, 4)
		unix.Close(fds[1])
		ctrlCall(t, ctrlA, 2, []byte{0, 0, 0, 0}, nil, 4)
		f := os.NewFile(uintptr(fds[0]), "d")
		dc, _ := net.FileConn(f)
		f.Close()
		respRC(t, dc, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0})
		for k := range 20 {
			if rc := respRC(t, dc, twoBankExtend(i*100+k)); rc != 0 {
				t.Fatalf("extend: %#x", rc)
			}
		}
		keep = append(keep, v, ctrlA, dc)
	}
	after := mem()
	per := (int64(after) - int64(before)) / n
	t.Logf("per served vTPM, busy: %d bytes (heap + goroutine stacks, %d vTPMs, buffers of %d-byte commands included)", per, n, vtpm.MaxBufferSize)
	if per > 64<<10 {
		t.Errorf("a served vTPM costs %d bytes, over the 64 KiB target", per)
	}
	// Idle for over a second, each gives its command buffers back.
	time.Sleep(1500 * time.Millisecond)
	idle := (int64(mem()) - int64(before)) / n
	t.Logf("per served vTPM, idle: %d bytes (its command buffers given back)", idle)
	if per-idle < 6<<10 {
		t.Errorf("an idle vTPM costs %d bytes, a busy one %d: the command buffers (about 8 KiB) were not given back", idle, per)
	}
	// Parked, an idle vTPM holds no goroutine stack either, and its PCRs
	// are one allocation a bank: about 6 KiB (7.4 KiB with a PCR value
	// allocated each, 15 KiB when each channel kept a goroutine).
	if idle > 7<<10 {
		t.Errorf("an idle vTPM costs %d bytes, over 7 KiB: are its channels parked (vtpm.Parker), its PCRs one allocation a bank?", idle)
	}
	if _, err := exec.LookPath("swtpm"); err == nil {
		data, swtpmPID := startSwtpm(t)
		for k := range 20 {
			respRC(t, data, twoBankExtend(k))
		}
		rss, err1 := procStatus(swtpmPID, "VmRSS")
		anon, err2 := procStatus(swtpmPID, "RssAnon")
		if err1 == nil && err2 == nil {
			t.Logf("swtpm per VM: VmRSS %d bytes (%.0f× the vTPM), RssAnon %d bytes (%.0f×)", rss, float64(rss)/float64(per), anon, float64(anon)/float64(per))
		}
	}
	runtime.KeepAlive(keep)
}

type forgetJournal struct{}

func (forgetJournal) Append(context.Context, vpcr.Event) error { return nil }

func unixPair(t testing.TB) (*net.UnixConn, *net.UnixConn) {
	a, b := socketPair(t)
	return a.(*net.UnixConn), b.(*net.UnixConn)
}
