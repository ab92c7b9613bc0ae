package daemon

import (
	"encoding/hex"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/control"
)

// TestEvidenceNames checks every way an operator may name a VM to
// `evidence --vm` (issue: only the 64-hex id worked): name, uuid, instance
// and id, whole, as the prefixes `vms` prints, in upper case; and that
// what is ambiguous or unknown is an error that says how to name it.
func TestEvidenceNames(t *testing.T) {
	e := newEnv(t)
	e.start()
	const uuidA, uuidB = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-a", uuidA)})
	// vm-b has two ended instances and no live one.
	for range 2 {
		e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-b", uuidB)})
		e.mustCall(&control.Request{Op: control.OpRelease, Name: "vm-b", Reason: "shutdown"})
	}
	a := vmRow(t, e, "vm-a", false)
	var ended []control.VM
	for _, v := range e.mustCall(&control.Request{Op: control.OpVMs, All: true}).VMs {
		if v.Name == "vm-b" {
			ended = append(ended, v)
		}
	}
	if a == nil || len(ended) != 2 {
		t.Fatalf("vms: a %+v, %d ended vm-b", a, len(ended))
	}
	b0 := ended[0]
	tests := []struct {
		name, q string
		want    string // the instance (hex) answered; "" for an error
		post    bool   // post-mortem evidence
		err     string
	}{
		{name: "name", q: "vm-a", want: a.Instance},
		{name: "uuid", q: uuidA, want: a.Instance},
		{name: "uuid in upper case", q: strings.ToUpper(uuidA), want: a.Instance},
		{name: "instance", q: a.Instance, want: a.Instance},
		{name: "instance as vms shows it", q: a.Instance[:12], want: a.Instance},
		{name: "id", q: a.ID, want: a.Instance},
		{name: "id as vms shows it", q: a.ID[:16], want: a.Instance},
		{name: "id in upper case", q: strings.ToUpper(a.ID), want: a.Instance},
		{name: "ended instance by id", q: b0.ID, want: b0.Instance, post: true},
		{name: "ended instance by instance prefix", q: b0.Instance[:12], want: b0.Instance, post: true},
		{name: "name with two ended instances", q: "vm-b", err: "2 vm instances named vm-b, none live"},
		{name: "uuid with two ended instances", q: uuidB, err: "2 vm instances with uuid"},
		{name: "too short a prefix", q: a.ID[:3], err: "at least 4 hex digits"},
		{name: "unknown", q: "vm-z", err: "no vm vm-z: name it by its name, uuid, instance or id"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := e.call(&control.Request{Op: control.OpEvidence, VM: tc.q, Nonce: []byte("n")})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				if !strings.Contains(err.Error(), "tpmmux-bridge vms --all") {
					t.Fatalf("err = %v: it does not say where to look", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			ev := resp.Evidence
			if got := ev.Identity.Instance; hexOf(got[:]) != tc.want || ev.PostMortem != tc.post {
				t.Fatalf("answered instance %x (post-mortem %v), want %s (%v)", got, ev.PostMortem, tc.want, tc.post)
			}
		})
	}
}

// TestVMsEmptyList: with no VMs, the vms answer is an empty list (JSON
// []), not null.
func TestVMsEmptyList(t *testing.T) {
	e := newEnv(t)
	e.start()
	for _, all := range []bool{false, true} {
		vms, err := controlHandler{e.d}.VMs(t.Context(), all)
		if err != nil || vms == nil || len(vms) != 0 {
			t.Fatalf("VMs(all=%v) = %#v, %v; want an empty, non-nil list", all, vms, err)
		}
	}
}

func hexOf(b []byte) string { return hex.EncodeToString(b) }
