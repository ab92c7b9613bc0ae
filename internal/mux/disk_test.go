package mux_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// TestFullDisk: when the log store's disk fills, records are refused, not
// acknowledged, and the reason is clear; once space is freed the bridge
// acknowledges again, and every record it acknowledged is in the evidence.
// It needs root to mount a small tmpfs (CI runs as root).
func TestFullDisk(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tpmmux-test", dir).CombinedOutput(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("mount tmpfs: %v: %s", err, out)
		}
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	defer exec.Command("umount", "-l", dir).Run()
	ctx := context.Background()
	tp, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	st, err := logstore.Open(filepath.Join(dir, "log.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m, err := mux.Open(ctx, tp, st, mux.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	a, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{7}, Name: "vm-a"})
	if err != nil {
		t.Fatal(err)
	}
	// Leave little room, then write until the store cannot grow.
	filler := filepath.Join(dir, "filler")
	exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=64k", "count=24").Run()
	big := func(i int) *record.Record {
		r := meas(i)
		r.Measurement.TemplateData = []byte(strings.Repeat("x", 16<<10) + string(rune('a'+i%26)))
		return r
	}
	acked := 0
	var failErr error
	for i := 1; i <= 400; i++ {
		if _, err := m.Append(ctx, a.ID(), big(i)); err != nil {
			failErr = err
			break
		}
		acked++
	}
	if failErr == nil {
		t.Fatal("the disk never filled")
	}
	if !strings.Contains(failErr.Error(), "no space left") && !strings.Contains(m.Status().Fault, "no space left") {
		t.Fatalf("unclear error on a full disk: %v (fault %q)", failErr, m.Status().Fault)
	}
	t.Logf("%d records acknowledged before the disk filled: %v", acked, failErr)
	os.Remove(filler)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := m.Append(ctx, a.ID(), big(1000))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after space was freed: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	nonce := []byte("after the full disk")
	ev, err := m.Evidence(ctx, a.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: a, AK: tp.AK(), PCR: 13})
	if err != nil {
		t.Fatalf("evidence after the full disk: %v", err)
	}
	if rep.Records < acked+2 {
		t.Fatalf("evidence holds %d records, %d were acknowledged (+ genesis, + the one after)", rep.Records, acked)
	}
}
