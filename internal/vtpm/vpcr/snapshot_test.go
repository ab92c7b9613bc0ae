package vpcr

import (
	"bytes"
	"testing"
)

// snapState is a running vTPM with a few extends and a pending allocation.
func snapState(t *testing.T) *State {
	t.Helper()
	s, err := New([]Alg{SHA1, SHA256})
	if err != nil {
		t.Fatal(err)
	}
	evs := []Event{
		{Seq: 1, Kind: KindInit},
		{Seq: 2, Kind: KindStartup, Banks: []Alg{SHA1, SHA256}},
		{Seq: 3, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA256, Value: bytes.Repeat([]byte{1}, 32)}, {Alg: SHA1, Value: bytes.Repeat([]byte{2}, 20)}}},
		{Seq: 4, Kind: KindAllocate, Banks: []Alg{SHA256}},
	}
	for _, e := range evs {
		if err := s.Apply(e); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// TestSnapshotRoundTrip: a migrated VM's vPCRs are the source's exactly,
// and the destination's events apply on top as they would have there.
func TestSnapshotRoundTrip(t *testing.T) {
	s := snapState(t)
	got, err := FromSnapshot(s.Snapshot())
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(s) || got.ResetCount() != s.ResetCount() {
		t.Fatal("snapshot round trip changed the state")
	}
	more := []Event{{Seq: 5, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA1, Value: bytes.Repeat([]byte{3}, 20)}}}}
	viaSnap, err := ReplayFrom(nil, s.Snapshot(), more)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(more[0]); err != nil {
		t.Fatal(err)
	}
	if !viaSnap.Equal(s) {
		t.Fatal("replay from a snapshot differs from the replay without migration")
	}
	// The snapshot is a copy: changing it does not change the state.
	sn := s.Snapshot()
	sn.Values[0].PCRs[10][0] ^= 1
	if bytes.Equal(sn.Values[0].PCRs[10], s.Read(SHA1, 10)) {
		t.Fatal("snapshot shares memory with the state")
	}
	// A snapshot with the wrong next seq refuses the destination's events.
	if _, err := ReplayFrom(nil, s.Snapshot(), more); err == nil {
		t.Fatal("an event with an old seq applied on a snapshot")
	}
}

// TestSnapshotRefused: a snapshot comes from another host; malformed ones
// are refused with a reason.
func TestSnapshotRefused(t *testing.T) {
	tests := []struct {
		name   string
		change func(sn *Snapshot)
	}{
		{"unknown bank", func(sn *Snapshot) { sn.Allocatable = []Alg{0x99} }},
		{"unsorted banks", func(sn *Snapshot) { sn.Allocatable = []Alg{SHA256, SHA1} }},
		{"active not allocatable", func(sn *Snapshot) { sn.Allocatable = []Alg{SHA256} }},
		{"no active bank", func(sn *Snapshot) { sn.Active = nil }},
		{"pending not allocatable", func(sn *Snapshot) { sn.Pending = []Alg{SHA384} }},
		{"missing bank values", func(sn *Snapshot) { sn.Values = sn.Values[:1] }},
		{"bank values swapped", func(sn *Snapshot) { sn.Values[0], sn.Values[1] = sn.Values[1], sn.Values[0] }},
		{"23 PCRs", func(sn *Snapshot) { sn.Values[0].PCRs = sn.Values[0].PCRs[:23] }},
		{"short digest", func(sn *Snapshot) { sn.Values[1].PCRs[10] = sn.Values[1].PCRs[10][:31] }},
		{"unknown phase", func(sn *Snapshot) { sn.Phase = 7 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sn := snapState(t).Snapshot()
			tc.change(sn)
			if _, err := FromSnapshot(sn); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	if _, err := FromSnapshot(nil); err == nil {
		t.Fatal("nil snapshot accepted")
	}
}
