package vpcr

import (
	"bytes"
	"crypto/sha256"
	"testing"
)

// TestPCClientRules: which locality may extend or reset which PCR.
func TestPCClientRules(t *testing.T) {
	tests := []struct {
		pcr           int
		extend, reset []uint8 // localities allowed
	}{
		{pcr: 0, extend: []uint8{0, 1, 2, 3, 4}},
		{pcr: 10, extend: []uint8{0, 1, 2, 3, 4}},
		{pcr: 15, extend: []uint8{0, 1, 2, 3, 4}},
		{pcr: 16, extend: []uint8{0, 1, 2, 3, 4}, reset: []uint8{0, 1, 2, 3}},
		{pcr: 17, extend: []uint8{2, 3, 4}, reset: []uint8{4}},
		{pcr: 20, extend: []uint8{1, 2, 3}, reset: []uint8{2, 4}},
		{pcr: 21, extend: []uint8{2}, reset: []uint8{2, 4}},
		{pcr: 23, extend: []uint8{0, 1, 2, 3, 4}, reset: []uint8{0, 1, 2, 3}},
		{pcr: 24},
		{pcr: -1},
	}
	for _, tc := range tests {
		for loc := uint8(0); loc <= 5; loc++ {
			in := func(l []uint8) bool { return bytes.IndexByte(l, loc) >= 0 }
			if got := CanExtend(tc.pcr, loc); got != in(tc.extend) {
				t.Errorf("CanExtend(%d, %d) = %v", tc.pcr, loc, got)
			}
			if got := CanReset(tc.pcr, loc); got != in(tc.reset) {
				t.Errorf("CanReset(%d, %d) = %v", tc.pcr, loc, got)
			}
		}
	}
}

// TestReplayRefuses: Replay rejects journals a vTPM could not have written.
func TestReplayRefuses(t *testing.T) {
	d := sha256.Sum256(nil)
	boot := []Event{{Seq: 1, Kind: KindInit}, {Seq: 2, Kind: KindStartup, Banks: []Alg{SHA1, SHA256}}}
	ext := func(seq uint64, pcr int, loc uint8) Event {
		return Event{Seq: seq, Kind: KindExtend, PCR: pcr, Locality: loc, Digests: []Digest{{Alg: SHA256, Value: d[:]}}}
	}
	tests := []struct {
		name   string
		events []Event
	}{
		{"gap in seq", append(boot[:2:2], ext(4, 10, 0))},
		{"extend before startup", []Event{ext(1, 10, 0)}},
		{"startup without init", []Event{{Seq: 1, Kind: KindStartup, Banks: []Alg{SHA1, SHA256}}}},
		{"second startup", append(boot[:2:2], Event{Seq: 3, Kind: KindStartup, Banks: []Alg{SHA1, SHA256}})},
		{"reset PCR 10", append(boot[:2:2], Event{Seq: 3, Kind: KindReset, PCR: 10})},
		{"extend PCR 21 at locality 0", append(boot[:2:2], ext(3, 21, 0))},
		{"inactive bank", append(boot[:2:2], Event{Seq: 3, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA384, Value: make([]byte, 48)}}})},
		{"short digest", append(boot[:2:2], Event{Seq: 3, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA256, Value: d[:20]}}})},
		{"startup banks differ", []Event{{Seq: 1, Kind: KindInit}, {Seq: 2, Kind: KindStartup, Banks: []Alg{SHA256}}}},
		{"allocate unconfigured bank", append(boot[:2:2], Event{Seq: 3, Kind: KindAllocate, Banks: []Alg{SHA512}})},
	}
	for _, tc := range tests {
		if _, err := Replay([]Alg{SHA1, SHA256}, tc.events); err == nil {
			t.Errorf("%s: replay accepted", tc.name)
		}
	}
	// And the good journal replays to the TPM's values.
	s, err := Replay([]Alg{SHA1, SHA256}, append(boot[:2:2], ext(3, 10, 0), ext(4, 10, 0)))
	if err != nil {
		t.Fatal(err)
	}
	h1 := sha256.Sum256(append(make([]byte, 32), d[:]...))
	h2 := sha256.Sum256(append(h1[:], d[:]...))
	if !bytes.Equal(s.Read(SHA256, 10), h2[:]) || !bytes.Equal(s.Read(SHA1, 10), make([]byte, 20)) {
		t.Fatalf("replayed PCR 10: %x / %x", s.Read(SHA256, 10), s.Read(SHA1, 10))
	}
	if !bytes.Equal(s.Read(SHA256, 17), bytes.Repeat([]byte{0xff}, 32)) {
		t.Fatal("PCR 17 does not start at all ones")
	}
}

// TestValuesApart: the PCRs of a bank share one allocation, yet an extend
// or a reset changes only its own PCR, Read and Clone copy, and a clone
// changes apart from its original.
func TestValuesApart(t *testing.T) {
	d := sha256.Sum256([]byte("x"))
	s, err := Replay([]Alg{SHA1, SHA256}, []Event{
		{Seq: 1, Kind: KindInit},
		{Seq: 2, Kind: KindStartup, Banks: []Alg{SHA1, SHA256}},
		{Seq: 3, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA256, Value: d[:]}, {Alg: SHA1, Value: d[:20]}}},
		{Seq: 4, Kind: KindExtend, PCR: 16, Digests: []Digest{{Alg: SHA256, Value: d[:]}}},
		{Seq: 5, Kind: KindExtend, PCR: 16, Digests: []Digest{{Alg: SHA256, Value: d[:]}}},
		{Seq: 6, Kind: KindReset, PCR: 16},
	})
	if err != nil {
		t.Fatal(err)
	}
	want10 := sha256.Sum256(append(make([]byte, 32), d[:]...))
	if got := s.Read(SHA256, 10); !bytes.Equal(got, want10[:]) {
		t.Fatalf("PCR 10 %x, want %x", got, want10)
	}
	for _, i := range []int{9, 11, 16} {
		if got := s.Read(SHA256, i); !bytes.Equal(got, make([]byte, 32)) {
			t.Errorf("PCR %d changed: %x", i, got)
		}
	}
	if got := s.Read(SHA256, 17); !bytes.Equal(got, bytes.Repeat([]byte{0xFF}, 32)) {
		t.Errorf("PCR 17 %x, want all ones", got)
	}
	if got := s.Read(SHA1, 10); len(got) != 20 || bytes.Equal(got, make([]byte, 20)) {
		t.Errorf("sha1 PCR 10 %x: not extended", got)
	}
	s.Read(SHA256, 10)[0] ^= 1
	c := s.Clone()
	if err := c.Apply(Event{Seq: 7, Kind: KindExtend, PCR: 10, Digests: []Digest{{Alg: SHA256, Value: d[:]}}}); err != nil {
		t.Fatal(err)
	}
	if got := s.Read(SHA256, 10); !bytes.Equal(got, want10[:]) {
		t.Errorf("the original's PCR 10 changed with its Read's copy or its clone: %x", got)
	}
	if c.Equal(s) || bytes.Equal(c.Read(SHA256, 10), want10[:]) {
		t.Error("the clone's extend did not change the clone")
	}
}
