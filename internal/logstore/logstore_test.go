package logstore

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "log.db")
	s, err := Open(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, p
}

func TestEpochsBatchesRecords(t *testing.T) {
	s, p := open(t)
	if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("store mode %v %v, want 0600", fi.Mode(), err)
	}
	if _, ok, err := s.CurrentEpoch(); ok || err != nil {
		t.Fatalf("fresh store has an epoch: %v", err)
	}
	now := time.Unix(1, 0)
	if err := s.BeginEpoch(1, []byte{0xa0}, Batch{G0: 0, N: 1, Epoch: []byte{0xa0}}, now); err != nil {
		t.Fatal(err)
	}
	id := [32]byte{7}
	vm := VM{ID: id, Name: "vm-a", Epoch: 1, NextSeq: 2}
	c := &Commit{Epoch: 1, Index: 1, Batch: Batch{G0: 1, N: 2, Entries: make([]byte, 128)},
		Records: []Put{{ID: id, Record: Record{Seq: 0, G: 1, Batch: 1, R: []byte{1}}}, {ID: id, Record: Record{Seq: 1, G: 2, Batch: 1, R: []byte{2}}}},
		VMs:     []VM{vm}}
	if err := s.Commit(c); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(c); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("a batch was written twice: %v", err)
	}
	err := s.View(func(sn *Snapshot) error {
		var idx []uint64
		if err := sn.Batches(1, 0, func(i uint64, b *Batch) error { idx = append(idx, i); return nil }); err != nil {
			return err
		}
		if len(idx) != 2 || idx[1] != 1 {
			t.Fatalf("batches %v", idx)
		}
		var seqs []uint64
		sn.Records(id, 0, func(r *Record) error { seqs = append(seqs, r.Seq); return nil })
		if len(seqs) != 2 {
			t.Fatalf("records %v", seqs)
		}
		var last []uint64
		sn.LastRecords(id, func(r *Record) bool { last = append(last, r.Seq); return true })
		if len(last) != 2 || last[0] != 1 {
			t.Fatalf("newest-first records %v", last)
		}
		if _, err := sn.VM([32]byte{9}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unknown vm: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A new epoch ends the live VMs of the old one.
	if err := s.BeginEpoch(2, []byte{0xa1}, Batch{G0: 0, N: 1}, now); err != nil {
		t.Fatal(err)
	}
	if err := s.BeginEpoch(2, []byte{0xa1}, Batch{}, now); err == nil {
		t.Fatal("epoch 2 began twice")
	}
	s.View(func(sn *Snapshot) error {
		got, err := sn.VM(id)
		if err != nil || !got.Ended || got.EndedBy != "epoch-ended" {
			t.Fatalf("vm after new epoch: %+v %v", got, err)
		}
		return nil
	})
}

func TestRefusesOtherFormat(t *testing.T) {
	s, p := open(t)
	s.Close()
	db, err := bolt.Open(p, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyFormat, u64(99)) })
	db.Close()
	if _, err := Open(p, nil); err == nil || !strings.Contains(err.Error(), "format") {
		t.Fatalf("opened a store of another format: %v", err)
	}
}

// TestSegments: a VM that comes back by live migration opens a new segment
// under the same id; the ended one is kept with its final quote, a live
// one is never replaced, nor one with more records than the new segment
// starts after, and Forget destroys every segment.
func TestSegments(t *testing.T) {
	s, _ := open(t)
	now := time.Unix(1, 0)
	if err := s.BeginEpoch(1, []byte{0xa0}, Batch{G0: 0, N: 1, Epoch: []byte{0xa0}}, now); err != nil {
		t.Fatal(err)
	}
	id := [32]byte{7}
	batch := uint64(1)
	commit := func(vm VM, seq uint64, opens bool) error {
		c := &Commit{Epoch: 1, Index: batch, Batch: Batch{G0: batch, N: 1, Entries: make([]byte, 64)},
			Records: []Put{{ID: id, Record: Record{Seq: seq, G: batch, Batch: batch, R: []byte{byte(seq)}}}}, VMs: []VM{vm}}
		if opens {
			c.Opens = [][32]byte{id}
		}
		err := s.Commit(c)
		if err == nil {
			batch++
		}
		return err
	}
	first := VM{ID: id, Name: "vm-m", Epoch: 1, NextSeq: 5}
	if err := commit(first, 4, false); err != nil {
		t.Fatal(err)
	}
	back := VM{ID: id, Name: "vm-m", Epoch: 1, FirstSeq: 10, NextSeq: 11, Chain: []byte{0x80}}
	if err := commit(back, 10, true); err == nil || !strings.Contains(err.Error(), "cannot replace") {
		t.Fatalf("a live segment was replaced: %v", err)
	}
	first.Ended, first.EndedBy, first.NextSeq = true, "migrated-out", 6
	if err := commit(first, 5, false); err != nil {
		t.Fatal(err)
	}
	if err := s.PutFinal(id, &FinalQuote{Epoch: 1, Batch: 2, Attest: []byte{1}}); err != nil {
		t.Fatal(err)
	}
	early := VM{ID: id, Name: "vm-m", Epoch: 1, FirstSeq: 3, NextSeq: 4}
	if err := commit(early, 3, true); err == nil || !strings.Contains(err.Error(), "cannot replace") {
		t.Fatalf("a segment was replaced by one that starts inside it: %v", err)
	}
	if err := commit(back, 10, true); err != nil {
		t.Fatal(err)
	}
	var segs []Segment
	s.View(func(sn *Snapshot) error {
		sn.Segments(id, func(sg *Segment) error { segs = append(segs, *sg); return nil })
		cur, err := sn.VM(id)
		if err != nil || cur.FirstSeq != 10 || cur.Ended || len(cur.Chain) != 1 {
			t.Fatalf("current segment %+v %v", cur, err)
		}
		if _, err := sn.Final(id); !errors.Is(err, ErrNotFound) {
			t.Fatalf("the old segment's final quote is still the current one's: %v", err)
		}
		return nil
	})
	if len(segs) != 1 || segs[0].VM.NextSeq != 6 || segs[0].Final == nil || segs[0].Final.Batch != 2 {
		t.Fatalf("kept segments %+v", segs)
	}
	back.Ended = true
	if err := commit(back, 11, false); err != nil {
		t.Fatal(err)
	}
	if err := s.Forget(id); err != nil {
		t.Fatal(err)
	}
	s.View(func(sn *Snapshot) error {
		n := 0
		sn.Segments(id, func(*Segment) error { n++; return nil })
		sn.Records(id, 0, func(*Record) error { n++; return nil })
		if cur, _ := sn.VM(id); n != 0 || len(cur.Chain) != 0 {
			t.Fatalf("forgotten vm keeps %d segments or records, chain %d bytes", n, len(cur.Chain))
		}
		return nil
	})
}
