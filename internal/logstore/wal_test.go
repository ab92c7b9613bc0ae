package logstore

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// walStep stages recs and c and then applies c if apply is set.
type walStep struct {
	recs  []Staged
	c     *Commit
	apply bool
}

// TestWALReplay: batches staged in the write-ahead log but not applied
// are applied by the next Open, and staged records no batch holds are
// returned by Unbatched, in order, whatever was applied before the crash.
func TestWALReplay(t *testing.T) {
	id := [32]byte{9}
	vm := VM{ID: id, Name: "vm-w", Epoch: 1}
	rec := func(seq uint64) Staged { return Staged{Epoch: 1, ID: id, Seq: seq, R: []byte{byte(seq)}} }
	commit := func(index uint64, seqs ...uint64) *Commit {
		c := &Commit{Epoch: 1, Index: index, Batch: Batch{G0: index * 10, N: uint32(len(seqs)), Entries: make([]byte, 64*len(seqs))}}
		v := vm
		for _, s := range seqs {
			c.Records = append(c.Records, Put{ID: id, Record: Record{Seq: s, G: index*10 + s, Batch: index, R: []byte{byte(s)}}})
			v.NextSeq = s + 1
		}
		c.VMs = []VM{v}
		return c
	}
	genesis := rec(0)
	g := vm
	genesis.VM = &g
	for _, tc := range []struct {
		name string
		// steps stage (and apply, when apply is set) in order.
		steps         []walStep
		wantBatches   int // batches of epoch 1 in bbolt after reopen (batch 0 included)
		wantUnbatched []uint64
	}{
		{name: "staged only", steps: []walStep{{recs: []Staged{genesis, rec(1)}}}, wantBatches: 1, wantUnbatched: []uint64{0, 1}},
		{name: "batched, not applied", steps: []walStep{{recs: []Staged{genesis, rec(1)}, c: commit(1, 0, 1)}, {recs: []Staged{rec(2)}}}, wantBatches: 2, wantUnbatched: []uint64{2}},
		{name: "applied", steps: []walStep{{recs: []Staged{genesis, rec(1)}, c: commit(1, 0, 1), apply: true}, {recs: []Staged{rec(2), rec(3)}, c: commit(2, 2)}}, wantBatches: 3, wantUnbatched: []uint64{3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "log.db")
			s, err := Open(p, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.BeginEpoch(1, []byte{0xa0}, Batch{G0: 0, N: 1, Epoch: []byte{0xa0}}, time.Unix(1, 0)); err != nil {
				t.Fatal(err)
			}
			for _, st := range tc.steps {
				if _, _, err := s.Stage(st.recs, st.c); err != nil {
					t.Fatal(err)
				}
				if st.apply {
					if err := s.Apply([]*Commit{st.c}); err != nil {
						t.Fatal(err)
					}
				}
			}
			s.Close()
			s, err = Open(p, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			n := 0
			s.View(func(sn *Snapshot) error {
				return sn.Batches(1, 0, func(uint64, *Batch) error { n++; return nil })
			})
			if n != tc.wantBatches {
				t.Errorf("%d batches after reopen, want %d", n, tc.wantBatches)
			}
			un, _ := s.Unbatched()
			var seqs []uint64
			for _, u := range un {
				seqs = append(seqs, u.Seq)
			}
			if len(seqs) != len(tc.wantUnbatched) || (len(seqs) > 0 && seqs[0] != tc.wantUnbatched[0]) {
				t.Errorf("unbatched %v, want %v", seqs, tc.wantUnbatched)
			}
		})
	}
}

// TestWALReplayRefusesGap: a staged batch that does not follow bbolt's
// last one is refused with a clear error, not applied out of order.
func TestWALReplayRefusesGap(t *testing.T) {
	p := filepath.Join(t.TempDir(), "log.db")
	s, err := Open(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.BeginEpoch(1, []byte{0xa0}, Batch{G0: 0, N: 1, Epoch: []byte{0xa0}}, time.Unix(1, 0)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Stage(nil, &Commit{Epoch: 1, Index: 3}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := Open(p, nil); err == nil || !strings.Contains(err.Error(), "next batch is 1") {
		t.Fatalf("Open = %v, want a refusal of batch 3 after batch 0", err)
	}
}
