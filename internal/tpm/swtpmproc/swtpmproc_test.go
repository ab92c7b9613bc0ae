package swtpmproc_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

func TestStartStop(t *testing.T) {
	swtpmproc.Need(t)
	p, err := swtpmproc.StartWith(t.Context(), swtpmproc.Options{StateDir: t.TempDir(), DieWithParent: true})
	if err != nil {
		t.Fatal(err)
	}
	host, port, err := net.SplitHostPort(p.Addr())
	if err != nil || host != "127.0.0.1" {
		t.Fatalf("Addr = %q", p.Addr())
	}
	if want := fmt.Sprintf("127.0.0.1:%d", p.Port()+1); p.CtrlAddr() != want {
		t.Errorf("CtrlAddr = %q, want %q (server port + 1)", p.CtrlAddr(), want)
	}
	if want := "swtpm:127.0.0.1:" + port; p.Spec() != want {
		t.Errorf("Spec = %q, want %q", p.Spec(), want)
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(); err != nil {
		t.Errorf("second Stop = %v", err)
	}
	if c, err := net.Dial("tcp", p.Addr()); err == nil {
		c.Close()
		t.Error("server port still accepts after Stop")
	}
	if _, err := os.Stat(filepath.Join(p.StateDir(), "tpm2-00.permall")); err != nil {
		t.Errorf("no permanent state after Stop: %v", err)
	}
}

// pcrs opens the TPM, runs f, reads PCRs 10 and 23 and closes it.
func pcrs(t *testing.T, p *swtpmproc.Proc, f func(tpm.TPM)) (p10, p23 [32]byte, akPEM string) {
	t.Helper()
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := tp.Close(); err != nil {
			t.Fatal(err)
		}
	}()
	if f != nil {
		f(tp)
	}
	v, err := tp.ReadPCRs(t.Context(), []int{10, 23})
	if err != nil {
		t.Fatal(err)
	}
	pem, err := tpm.AKPEM(tp.AK())
	if err != nil {
		t.Fatal(err)
	}
	return v[0], v[1], string(pem)
}

func extend(t *testing.T, s string) func(tpm.TPM) {
	return func(tp tpm.TPM) {
		for _, p := range []int{10, 23} {
			if err := tp.Extend(t.Context(), p, sha256.Sum256([]byte(s))); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestPersistenceSemantics pins down what survives a swtpm process restart
// (see the package comment).
func TestPersistenceSemantics(t *testing.T) {
	swtpmproc.Need(t)
	ctx := t.Context()
	dir := t.TempDir()
	opts := swtpmproc.Options{StateDir: dir, DieWithParent: true}
	var zero [32]byte

	p, err := swtpmproc.StartWith(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	a10, a23, ak := pcrs(t, p, extend(t, "boot 1"))
	if a23 == zero || a10 == zero {
		t.Fatal("extend had no effect")
	}

	t.Run("reconnect keeps PCRs", func(t *testing.T) {
		// The bridge-crash case: swtpm keeps running.
		b10, b23, _ := pcrs(t, p, nil)
		if b10 != a10 || b23 != a23 {
			t.Error("PCRs changed across a reconnect")
		}
	})

	t.Run("restart resets PCRs, keeps AK", func(t *testing.T) {
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		p, err = swtpmproc.StartWith(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		b10, b23, ak2 := pcrs(t, p, extend(t, "boot 2"))
		if ak2 != ak {
			t.Error("AK changed across a swtpm restart")
		}
		if b23 == a23 || b10 == a10 {
			t.Error("PCRs survived a plain restart")
		}
		a10, a23 = b10, b23
	})

	t.Run("save and resume keeps PCRs", func(t *testing.T) {
		if err := p.StopSaveState(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(dir, swtpmproc.VolatileStateFile)); err != nil {
			t.Fatalf("no volatile state saved: %v", err)
		}
		p, err = swtpmproc.StartWith(ctx, swtpmproc.Options{StateDir: dir, Resume: true, DieWithParent: true})
		if err != nil {
			t.Fatal(err)
		}
		b10, b23, _ := pcrs(t, p, nil)
		if b10 != a10 || b23 != a23 {
			t.Errorf("PCRs after resume: 10=%x 23=%x, want %x %x", b10, b23, a10, a23)
		}
		if _, err := os.Stat(filepath.Join(dir, swtpmproc.VolatileStateFile)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("volatile state file still present after resume: %v", err)
		}
	})

	t.Run("no rollback to an old snapshot", func(t *testing.T) {
		// swtpm itself would reload a leftover volatilestate on every start;
		// plant one and check Start ignores it.
		if err := p.StopSaveState(); err != nil {
			t.Fatal(err)
		}
		p, err = swtpmproc.StartWith(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		b10, b23, _ := pcrs(t, p, nil)
		if b23 != zero || b10 != zero {
			t.Errorf("Start resurrected saved PCRs: 10=%x 23=%x", b10, b23)
		}
		if _, err := swtpmproc.Resume(ctx, t.TempDir()); err == nil || !strings.Contains(err.Error(), "no saved volatile state") {
			t.Errorf("Resume without saved state = %v", err)
		}
	})

	t.Run("kill loses PCRs", func(t *testing.T) {
		pcrs(t, p, extend(t, "before kill"))
		if err := p.Kill(); err != nil {
			t.Fatal(err)
		}
		p, err = swtpmproc.StartWith(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		b10, b23, ak2 := pcrs(t, p, nil)
		if b23 != zero || b10 != zero {
			t.Error("PCRs survived SIGKILL")
		}
		if ak2 != ak {
			t.Error("AK changed across SIGKILL")
		}
	})
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
}

func TestStopAfterExit(t *testing.T) {
	p := swtpmproc.StartTest(t)
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil {
		t.Errorf("second Kill = %v", err)
	}
}

// fakeTB records what Need does.
type fakeTB struct {
	skipped, failed bool
	msg             string
}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Skipf(format string, args ...any) {
	f.skipped, f.msg = true, fmt.Sprintf(format, args...)
}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.failed, f.msg = true, fmt.Sprintf(format, args...)
}
func (f *fakeTB) Cleanup(func())           {}
func (f *fakeTB) TempDir() string          { return "" }
func (f *fakeTB) Context() context.Context { return context.Background() }

func TestNeed(t *testing.T) {
	t.Setenv("PATH", t.TempDir()) // no swtpm here
	tests := []struct {
		ci                   string
		wantSkip, wantFailed bool
	}{
		{"", true, false},
		{"false", true, false},
		{"true", false, true},
	}
	for _, tc := range tests {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			var f fakeTB
			swtpmproc.Need(&f)
			if f.skipped != tc.wantSkip || f.failed != tc.wantFailed {
				t.Errorf("skipped=%v failed=%v, want %v %v", f.skipped, f.failed, tc.wantSkip, tc.wantFailed)
			}
			if !strings.Contains(f.msg, "swtpm not available") {
				t.Errorf("message %q does not say swtpm is missing", f.msg)
			}
		})
	}
	if _, err := swtpmproc.Start(t.Context(), t.TempDir()); err == nil {
		t.Error("Start without swtpm in PATH succeeded")
	}
}

// TestStopWhileConnected stops swtpm while a client holds its connection:
// the control channel still works, so the stop is graceful and prompt.
func TestStopWhileConnected(t *testing.T) {
	swtpmproc.Need(t)
	p, err := swtpmproc.StartWith(t.Context(), swtpmproc.Options{StateDir: t.TempDir(), DieWithParent: true})
	if err != nil {
		t.Fatal(err)
	}
	tp, err := tpm.Open(t.Context(), p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Stop took %v (graceful shutdown ignored?)", d)
	}
	if err := tp.Extend(t.Context(), 23, [32]byte{}); err == nil {
		t.Error("Extend after swtpm stopped succeeded")
	}
	_ = tp.Close()
}

// TestStartError reports swtpm's own complaint when it cannot start.
func TestStartError(t *testing.T) {
	swtpmproc.Need(t)
	dir := t.TempDir()
	// A state file swtpm cannot read makes it exit at start-up.
	if err := os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := swtpmproc.StartWith(t.Context(), swtpmproc.Options{StateDir: dir, DieWithParent: true})
	if err == nil {
		t.Fatal("swtpm started on a corrupt state file")
	}
	t.Logf("error: %v", err)
	if !strings.Contains(err.Error(), "swtpm output") {
		t.Errorf("error %q does not carry swtpm's output", err)
	}
}
