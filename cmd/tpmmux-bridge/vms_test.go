package main

import (
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/daemon"
)

// TestVMsEmpty: on a bridge with no VMs, `vms --all --json` prints an
// empty JSON list (a script iterating it must not meet null), the table
// has its header with the ID column, and evidence for a VM that does not
// exist says how to name one.
func TestVMsEmpty(t *testing.T) {
	h := newHost(t)
	d, err := daemon.Start(t.Context(), h.cfg, daemon.Options{Version: version, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Shutdown()
	for _, args := range [][]string{{"vms", "--json"}, {"vms", "--all", "--json"}} {
		code, out, stderr := h.cli(args...)
		if code != 0 || strings.TrimSpace(out) != "[]" {
			t.Fatalf("%v: exit %d, %q %s", args, code, out, stderr)
		}
	}
	code, out, _ := h.cli("vms", "--all")
	if f := strings.Fields(out); code != 0 || len(f) != 9 || f[4] != "ID" {
		t.Fatalf("vms --all on no VMs: exit %d\n%s", code, out)
	}
	// An unknown VM: one line that says what --vm takes, the op named once.
	code, _, stderr := h.cli("evidence", "--vm", "vm-z", "--nonce", "00", "--out", t.TempDir())
	if code != 1 || !strings.Contains(stderr, "tpmmux-bridge evidence: no vm vm-z: name it by its name, uuid, instance or id") ||
		strings.Contains(stderr, "evidence: evidence:") {
		t.Fatalf("evidence --vm vm-z: exit %d: %s", code, stderr)
	}
}
