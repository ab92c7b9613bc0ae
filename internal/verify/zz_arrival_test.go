package verify_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// TestMigratedLaunchAppraised: a VM that migrated was started on its new
// host from the domain XML and files its migrated-in record measured; a
// launch policy pins them as it pins the genesis's, so a destination that
// starts the VM on another kernel is a violation naming that host and the
// migrated-in record. (The file sorts after tamper_test.go: the simulator
// PCR it needs is untouched there.)
func TestMigratedLaunchAppraised(t *testing.T) {
	kernel := func(content string) []record.File {
		d := sha256.Sum256([]byte(content))
		return []record.File{{Role: "kernel", Path: "/var/lib/guests/vmlinuz", SHA256: d[:]}}
	}
	good, evil := kernel("the tenant's kernel"), kernel("another kernel")
	a, b := newMHost(t, "hosta"), newMHost(t, "hostb")
	l := mux.Launch{UUID: [16]byte{0x16, 1}, Name: "vm-launch", Files: good}
	ident, err := a.m.NewVM(t.Context(), l)
	if err != nil {
		t.Fatal(err)
	}
	aks := []*ecdsa.PublicKey{a.tp.AK(), b.tp.AK()}
	a.add(ident.ID(), "vm-launch", 1, 3)
	nonce := bytes.Repeat([]byte{7}, 32)

	tests := []struct {
		name   string
		arrive []record.File
		want   string // "" trusted, else the violation's path
	}{
		{"same kernel on the destination", good, ""},
		{"another kernel on the destination (back on A)", evil, "launch@hosta:kernel:/var/lib/guests/vmlinuz"},
	}
	src := a
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := b
			if i%2 == 1 {
				dst = a
			}
			la := l
			la.Files = tt.arrive
			move(t, src, dst, ident, la, nil, aks...)
			src = dst
			ev := dst.fresh(ident.ID(), nonce)
			ap := policy.New(nil, nil).WithLaunch(&policy.LaunchPolicy{Files: map[string]policy.Digests{"kernel": {hex.EncodeToString(good[0].SHA256)}}})
			rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AKs: aks, Appraiser: ap})
			launch := ap.Report().Launch
			if tt.want == "" {
				if err != nil || len(rep.Violations) != 0 || launch == nil || !launch.OK {
					t.Fatalf("rejected: %v; launch %+v", err, launch)
				}
				return
			}
			if err == nil {
				t.Fatalf("trusted, want a rejection naming %s", tt.want)
			}
			var hit *verify.Violation
			for i := range rep.Violations {
				if strings.HasPrefix(rep.Violations[i].Path, "launch") {
					hit = &rep.Violations[i]
				}
			}
			first := rep.Segments[len(rep.Segments)-1].First
			if hit == nil || hit.Path != tt.want || hit.Seq != first || launch == nil || launch.OK || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("want a violation %s at record %d (the migrated-in), got %v %+v, launch %+v", tt.want, first, err, rep.Violations, launch)
			}
		})
	}
}
