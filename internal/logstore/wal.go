package logstore

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/fxamacker/cbor/v2"
	bolt "go.etcd.io/bbolt"
)

// The store's write-ahead log (internal/wal, in <path>.wal/) is its
// durability point: Stage makes records and batches durable with one
// write and one fdatasync, and Apply writes batches into the bbolt file
// afterwards, off the path of the acknowledgement. Open replays the batch
// frames bbolt does not have yet, and keeps the staged records no batch
// holds (Unbatched) for the multiplexer to batch before it recovers.

// Staged is one record made durable before it is batched: the VM's record
// Seq in epoch Epoch. VM is set for a record that opens a VM segment
// (genesis, migrated-in), whose VM state bbolt may not hold yet.
type Staged struct {
	Epoch uint64   `cbor:"1,keyasint"`
	ID    [32]byte `cbor:"2,keyasint"`
	Seq   uint64   `cbor:"3,keyasint"`
	R     []byte   `cbor:"4,keyasint"`
	VM    *VM      `cbor:"5,keyasint,omitempty"`
}

// walFrame is the payload of one write-ahead log frame: staged records or
// one batch commit.
type walFrame struct {
	Staged []Staged `cbor:"1,keyasint,omitempty"`
	Commit *Commit  `cbor:"2,keyasint,omitempty"`
}

// Stage makes staged records and then, if c is not nil, batch c durable
// in the write-ahead log with one write and one fdatasync. It returns the
// sequence numbers of the records' frame and of the batch's frame (0 for
// one not written). After an error the store must not be staged to again
// (the caller faults; the next Open recovers).
func (s *Store) Stage(recs []Staged, c *Commit) (recsFrame, commitFrame uint64, err error) {
	var payloads [][]byte
	if len(recs) > 0 {
		p, err := cbor.Marshal(&walFrame{Staged: recs})
		if err != nil {
			return 0, 0, fmt.Errorf("encode staged records: %w", err)
		}
		payloads = append(payloads, p)
	}
	if c != nil {
		p, err := cbor.Marshal(&walFrame{Commit: c})
		if err != nil {
			return 0, 0, fmt.Errorf("encode batch %d: %w", c.Index, err)
		}
		payloads = append(payloads, p)
	}
	s.walMu.Lock()
	defer s.walMu.Unlock()
	first, err := s.wal.Append(payloads...)
	if err != nil {
		return 0, 0, fmt.Errorf("stage: %w", err)
	}
	if len(recs) > 0 {
		recsFrame = first
		first++
	}
	if c != nil {
		commitFrame = first
	}
	return recsFrame, commitFrame, nil
}

// Apply writes batches that Stage made durable into the bbolt file, in
// order, in one transaction (fsynced unless Options.NoSync).
func (s *Store) Apply(cs []*Commit) error {
	if len(cs) == 0 {
		return nil
	}
	if s.opts.ApplyHook != nil {
		s.opts.ApplyHook(cs)
	}
	err := s.update(func(tx *bolt.Tx) error {
		for _, c := range cs {
			if err := commitTx(tx, c); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("apply batches %d-%d of epoch %d: %w", cs[0].Index, cs[len(cs)-1].Index, cs[0].Epoch, err)
	}
	return nil
}

// Release says every frame of the write-ahead log before frame seq is
// applied (its batch is in bbolt, or its records are in applied batches):
// segments that hold only such frames are deleted.
func (s *Store) Release(seq uint64) error {
	s.walMu.Lock()
	defer s.walMu.Unlock()
	s.released = max(s.released, seq)
	if _, err := s.wal.Release(seq); err != nil {
		return fmt.Errorf("release write-ahead log: %w", err)
	}
	return nil
}

// NextFrame is the sequence number the next frame Stage writes gets.
func (s *Store) NextFrame() uint64 {
	s.walMu.Lock()
	defer s.walMu.Unlock()
	return s.wal.Next()
}

// Unbatched returns the records the write-ahead log holds that no batch
// in bbolt or in the log holds, in the order they were staged, and the
// first frame they need: the multiplexer batches them on start, before it
// recovers. It is computed by Open.
func (s *Store) Unbatched() ([]Staged, uint64) { return s.unbatched, s.unbatchedFrom }

// replayWAL applies the batch frames bbolt lacks and computes Unbatched.
func (s *Store) replayWAL() error {
	frames := s.wal.Frames()
	type stagedAt struct {
		Staged
		frame uint64
	}
	var staged []stagedAt
	var commits []*Commit
	for _, f := range frames {
		var wf walFrame
		if err := cbor.Unmarshal(f.Payload, &wf); err != nil {
			return fmt.Errorf("write-ahead log frame %d: %w", f.Seq, err)
		}
		for _, st := range wf.Staged {
			staged = append(staged, stagedAt{st, f.Seq})
		}
		if wf.Commit != nil {
			commits = append(commits, wf.Commit)
		}
	}
	applied := 0
	err := s.update(func(tx *bolt.Tx) error {
		cur, ok := currentEpoch(tx)
		for _, c := range commits {
			if !ok || c.Epoch < cur {
				continue // applied before that epoch ended
			}
			if c.Epoch > cur {
				return fmt.Errorf("write-ahead log holds batch %d of epoch %d, the store's current epoch is %d", c.Index, c.Epoch, cur)
			}
			next := nextBatchIndex(tx, c.Epoch)
			switch {
			case c.Index < next:
				continue // applied already
			case c.Index > next:
				return fmt.Errorf("write-ahead log holds batch %d of epoch %d, but the store's next batch is %d", c.Index, c.Epoch, next)
			}
			if err := commitTx(tx, c); err != nil {
				return err
			}
			applied++
		}
		// Staged records no applied batch holds (records of every
		// segment of a VM are kept under its ID by number).
		records, vms := tx.Bucket(bucketRecords), tx.Bucket(bucketVMs)
		nextSeq := map[[32]byte]uint64{}
		for _, st := range staged {
			if !ok || st.Epoch != cur || records.Get(recordKey(st.ID, st.Seq)) != nil {
				continue
			}
			var stored *VM
			if raw := vms.Get(st.ID[:]); raw != nil {
				stored = new(VM)
				if err := cbor.Unmarshal(raw, stored); err != nil {
					return fmt.Errorf("decode vm %x: %w", st.ID[:8], err)
				}
				if stored.Forgotten {
					continue
				}
			}
			want, seen := nextSeq[st.ID]
			switch {
			case st.VM != nil:
				want = st.VM.FirstSeq
			case seen:
			case stored != nil:
				want = stored.NextSeq
			default:
				return fmt.Errorf("write-ahead log frame %d: record %d of vm %x, which the store does not know", st.frame, st.Seq, st.ID[:8])
			}
			if st.Seq != want {
				return fmt.Errorf("write-ahead log frame %d: record %d of vm %x where record %d belongs", st.frame, st.Seq, st.ID[:8], want)
			}
			nextSeq[st.ID] = want + 1
			if len(s.unbatched) == 0 {
				s.unbatchedFrom = st.frame
			}
			s.unbatched = append(s.unbatched, st.Staged)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("replay write-ahead log: %w", err)
	}
	if len(s.unbatched) == 0 {
		s.unbatchedFrom = s.wal.Next()
		s.released = s.wal.Next()
		if _, err := s.wal.Release(s.wal.Next()); err != nil {
			return fmt.Errorf("release write-ahead log: %w", err)
		}
	}
	return nil
}

func currentEpoch(tx *bolt.Tx) (uint64, bool) {
	v := tx.Bucket(bucketMeta).Get(keyEpoch)
	if len(v) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(v), true
}

// nextBatchIndex is one past the last batch of epoch in bbolt.
func nextBatchIndex(tx *bolt.Tx, epoch uint64) uint64 {
	c := tx.Bucket(bucketBatches).Cursor()
	k, _ := c.Seek(batchKey(epoch+1, 0))
	if k == nil {
		k, _ = c.Last()
	} else {
		k, _ = c.Prev()
	}
	if k == nil || len(k) != 16 || !bytes.HasPrefix(k, u64(epoch)) {
		return 0
	}
	return binary.BigEndian.Uint64(k[8:]) + 1
}

// dropAppliedWAL rotates the write-ahead log and deletes every segment
// whose frames are all applied (Compact: no copy of forgotten data may
// stay in a segment).
func (s *Store) dropAppliedWAL() error {
	s.walMu.Lock()
	defer s.walMu.Unlock()
	if err := s.wal.Rotate(); err != nil {
		return fmt.Errorf("rotate write-ahead log: %w", err)
	}
	if _, err := s.wal.Release(s.released); err != nil {
		return fmt.Errorf("release write-ahead log: %w", err)
	}
	return nil
}
