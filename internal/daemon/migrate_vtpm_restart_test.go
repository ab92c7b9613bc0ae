package daemon

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/vtpm"
)

// execTPM drives a vTPM's command processor directly, as a guest's
// kernel would through QEMU's data channel.
type execTPM struct {
	ctx context.Context
	v   *vtpm.VTPM
}

func (x execTPM) Send(cmd []byte) ([]byte, error) { return x.v.Execute(x.ctx, cmd), nil }

// A vTPM VM whose guest extended PCR 10 with no IMA entry sent yet (its
// agent behind its kernel, or none) migrates: the destination checks the
// chain's integrity, not the guest's pairing, which is the tenant's to
// judge (verify.Options.NoPairing). Then it keeps its vPCRs across a
// restart of the destination's bridge: they are the replay of this stay's
// events on the snapshot it arrived with (mux.VTPMStart), not of those
// events alone.
func TestMigratedVTPMSurvivesRestart(t *testing.T) {
	a, b := migHosts(t)
	withTPM := func(e *env) string {
		sock := filepath.Join(e.cfg.VTPMDir, "vm-w.sock")
		return strings.Replace(e.domainXML("vm-w", migUUID), "</devices>", "<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='"+sock+"'/></backend></tpm></devices>", 1)
	}
	xa, xb := withTPM(a), withTPM(b)
	a.mustCall(&control.Request{Op: control.OpPrepare, XML: xa})
	src := a.d.entry("vm-w")
	if src == nil || src.vtpm == nil {
		t.Fatal("no vTPM on the source")
	}
	guest := execTPM{ctx: t.Context(), v: src.vtpm.v}
	if rc := src.vtpm.v.Init(t.Context()); rc != 0 {
		t.Fatalf("INIT: rc %#x", rc)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(guest); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	for i := range 3 {
		ext := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(10), Auth: tpm2.PasswordAuth(nil)},
			Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: bytes.Repeat([]byte{byte(i + 1)}, 32)}}},
		}
		if _, err := ext.Execute(guest); err != nil {
			t.Fatalf("PCR_Extend: %v", err)
		}
	}
	want, err := a.d.vtpmSnapshot("vm-w")
	if err != nil || want == nil {
		t.Fatalf("source vTPM snapshot: %v %v", want, err)
	}
	b.mustCall(&control.Request{Op: control.OpMigrate, Name: "vm-w", XML: xb})
	b.mustCall(&control.Request{Op: control.OpPrepare, XML: xb})
	a.mustCall(&control.Request{Op: control.OpStopped, Name: "vm-w", Reason: "-"})
	a.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-w", Reason: "-"})
	waitFor(t, "the VM live on the destination, its vTPM adopted", func() bool {
		v := vmRow(t, b, "vm-w", false)
		return v != nil && v.Live && vtpmAdopted(b, "vm-w")
	})
	pcrs := func(e *env) string {
		t.Helper()
		ent := e.d.entry("vm-w")
		if ent == nil || ent.vtpm == nil || ent.vtpm.v.Incoming() {
			t.Fatal("no adopted vTPM on the destination")
		}
		return fmt.Sprint(ent.vtpm.v.PCRs().Snapshot())
	}
	if got := pcrs(b); got != fmt.Sprint(want) {
		t.Fatalf("vPCRs on arrival %s, want the source's %s", got, fmt.Sprint(want))
	}
	b.stop()
	b.start()
	if got := pcrs(b); got != fmt.Sprint(want) {
		t.Fatalf("vPCRs after the destination's restart %s, want %s (the arrival snapshot lost)", got, fmt.Sprint(want))
	}
}

// vtpmAdopted reports whether VM name's vTPM on e has taken its handover
// (the VM shows live at MigrateIn; the vTPM adopts its vPCRs right after).
func vtpmAdopted(e *env, name string) bool {
	ent := e.d.entry(name)
	if ent == nil {
		return false
	}
	ent.mu.Lock()
	s := ent.vtpm
	ent.mu.Unlock()
	return s != nil && s.v != nil && !s.v.Incoming()
}
