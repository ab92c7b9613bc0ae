package mux_test

import (
	"context"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/mux"
)

// TestLiveDefinedOnce checks that Lookup, VMs, LiveVMs and Info agree on
// which instance is live, through the cases that used to need care at each
// caller: two instances of one name (a new one prepared before the old
// one's teardown), a teardown, and a restart.
func TestLiveDefinedOnce(t *testing.T) {
	r := newRig(t, mux.Config{})
	ctx := context.Background()
	old := r.vm("vm-a")
	cur := r.vm("vm-a")
	b := r.vm("vm-b")
	agree := func(step string, wantLive map[conceal.Digest]bool) {
		t.Helper()
		infos, err := r.m.VMs()
		if err != nil {
			t.Fatal(err)
		}
		live, err := r.m.LiveVMs()
		if err != nil {
			t.Fatal(err)
		}
		nLive := 0
		for _, v := range infos {
			if v.Live != wantLive[v.ID] {
				t.Fatalf("%s: %s %x live=%v, want %v", step, v.Name, v.ID[:4], v.Live, wantLive[v.ID])
			}
			id, ok := r.m.Lookup(v.Name)
			if v.Live != (ok && id == v.ID && !v.Ended) {
				t.Fatalf("%s: VMs says %s %x live=%v, Lookup says %x %v", step, v.Name, v.ID[:4], v.Live, id[:4], ok)
			}
			one, err := r.m.Info(v.ID)
			if err != nil || one.Live != v.Live {
				t.Fatalf("%s: Info(%x).Live = %v (%v), VMs says %v", step, v.ID[:4], one.Live, err, v.Live)
			}
			if v.Live {
				nLive++
			}
		}
		if len(live) != nLive {
			t.Fatalf("%s: LiveVMs lists %d, VMs marks %d live", step, len(live), nLive)
		}
	}
	agree("two instances of vm-a", map[conceal.Digest]bool{cur.ID(): true, b.ID(): true})
	if _, err := r.m.Teardown(ctx, cur.ID(), "shutdown"); err != nil {
		t.Fatal(err)
	}
	// The older instance has no teardown either: it is the live one of
	// its name again until it gets one.
	agree("newer torn down", map[conceal.Digest]bool{old.ID(): true, b.ID(): true})
	if _, err := r.m.Teardown(ctx, old.ID(), "missed-stop"); err != nil {
		t.Fatal(err)
	}
	agree("both torn down", map[conceal.Digest]bool{b.ID(): true})
	r.close()
	r.open(mux.Config{})
	agree("after a restart", map[conceal.Digest]bool{b.ID(): true})
}
