package daemon

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// A second bridge on the same state directory says which bridge holds it,
// before it touches the TPM or the log store (whose own lock would only
// time out), and the state is free again once the first lets go.
func TestSecondBridgeOnSameState(t *testing.T) {
	dir := t.TempDir()
	release, err := lockState(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.StateDir = dir
	cfg.TPM = "device:" + dir + "/no-such-tpm" // never reached
	err = Run(context.Background(), cfg, Options{})
	want := fmt.Sprintf("another tpmmux-bridge (pid %d) holds %s: stop it first", os.Getpid(), dir)
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("second bridge: %v\nwant %q", err, want)
	}
	release()
	err = Run(context.Background(), cfg, Options{})
	if err == nil || strings.Contains(err.Error(), "another tpmmux-bridge") {
		t.Fatalf("after release: %v, want the missing TPM", err)
	}
}

// --tpm aimed at swtpm's control channel is named as such at once; the
// TPM channel passes the probe and still works after it.
func TestSwtpmControlPort(t *testing.T) {
	if err := swtpmproc.Available(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := swtpmproc.Start(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	ctrl := "swtpm:" + p.CtrlAddr()
	err = checkSwtpmPort(ctx, ctrl)
	if err == nil || !strings.Contains(err.Error(), "is swtpm's control channel (--ctrl), not its TPM") {
		t.Fatalf("control port: %v", err)
	}
	if err := checkSwtpmPort(ctx, p.Spec()); err != nil {
		t.Fatalf("TPM port: %v", err)
	}
	tp, err := tpm.Open(ctx, p.Spec())
	if err != nil {
		t.Fatalf("open the TPM after the probe: %v", err)
	}
	tp.Close()
	// Through Run, before anything else is opened.
	cfg := DefaultConfig()
	cfg.StateDir, cfg.TPM = t.TempDir(), ctrl
	start := time.Now()
	if err := Run(ctx, cfg, Options{}); err == nil || !strings.Contains(err.Error(), "control channel") {
		t.Fatalf("run on the control port: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
}
