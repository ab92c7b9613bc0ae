// Package logstore is the durable host log of tpmmux: epochs, batches of
// public leaves, per-VM records and identities, and post-mortem quotes, kept
// in one bbolt file behind a write-ahead log (wal.go). The multiplexer
// stages records and batches in the write-ahead log, one fdatasync per
// group, which is what makes the write-ahead rule (docs/protocol.md, Group
// commit) hold: a batch is durable before the bridge extends it into the
// TPM. Apply then writes the batches into bbolt off the acknowledgement's
// path, and Open replays what bbolt missed.
package logstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/fxamacker/cbor/v2"
	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/wal"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketMeta    = []byte("meta")
	bucketEpochs  = []byte("epochs")
	bucketBatches = []byte("batches")
	bucketVMs     = []byte("vms")
	bucketRecords = []byte("records")
	bucketFinal   = []byte("final")
	// bucketSegments keeps a VM's earlier, ended segments on this host
	// (it left by live migration and came back): ID || u64(FirstSeq).
	bucketSegments = []byte("segments")
	keyEpoch       = []byte("epoch")
	keyFormat      = []byte("format")
	keyDataKey     = []byte("datakey")
)

// formatVersion is the on-disk layout version; Open refuses any other.
const formatVersion = 1

// ErrNotFound reports a VM, record or quote the store does not hold.
var ErrNotFound = errors.New("not found")

// Batch is one group commit: the public entries of global indices
// [G0, G0+N). The first batch of an epoch carries the epoch record, which
// takes global index 0, and its Entries start at index 1.
type Batch struct {
	G0      uint64   `cbor:"1,keyasint"`
	N       uint32   `cbor:"2,keyasint"`
	Epoch   []byte   `cbor:"3,keyasint,omitempty"` // canonical epoch record (first batch only)
	Entries []byte   `cbor:"4,keyasint"`           // concatenated t||c, conceal.EntrySize bytes each
	V       [32]byte `cbor:"5,keyasint"`           // batch digest v_b that is extended
}

// EntryCount returns how many t||c entries the batch holds.
func (b *Batch) EntryCount() int { return conceal.EntryCount(b.Entries) }

// VM is the bridge's state for one VM instance.
type VM struct {
	ID       [32]byte `cbor:"1,keyasint"`
	UUID     [16]byte `cbor:"2,keyasint"`
	Instance [16]byte `cbor:"3,keyasint"`
	Name     string   `cbor:"4,keyasint"`
	CID      uint32   `cbor:"5,keyasint,omitempty"`
	Key      [32]byte `cbor:"6,keyasint"` // the concealment secret K, only when no sealer wraps it
	Epoch    uint64   `cbor:"7,keyasint"`
	NextSeq  uint64   `cbor:"8,keyasint"` // records 0..NextSeq-1 are durable
	Created  int64    `cbor:"9,keyasint"`
	Ended    bool     `cbor:"10,keyasint,omitempty"` // teardown durable, or the epoch ended under it
	EndedBy  string   `cbor:"11,keyasint,omitempty"`
	// Key 12 (per-VM guest state) was never written: do not reuse it.
	// WrappedKey is K encrypted under the store's data key, which only the
	// TPM can unseal; Key is then zero.
	WrappedKey []byte `cbor:"13,keyasint,omitempty"`
	EndedAt    int64  `cbor:"14,keyasint,omitempty"` // Unix ns of the teardown
	// Forgotten is set once the retention after teardown has passed: the
	// key and the records are destroyed; the leaves stay in the log but
	// nobody can link them any more.
	Forgotten bool `cbor:"15,keyasint,omitempty"`
	// FirstSeq is the number of this segment's first record: 0 (genesis)
	// for a VM started here, the migrated-in record's for one that came
	// by live migration (its numbering continues the source's).
	FirstSeq uint64 `cbor:"16,keyasint,omitempty"`
	// Chain is the VM's earlier segments on other hosts (canonical CBOR
	// of an evidence list, evidence.EncodeChain), which every evidence of
	// this segment carries as its Previous. Empty for a VM started here.
	Chain []byte `cbor:"17,keyasint,omitempty"`
}

// Segment is an earlier, ended segment of a VM on this host, kept when
// the VM came back by live migration and opened a new one (A -> B -> A).
type Segment struct {
	VM    VM          `cbor:"1,keyasint"`
	Final *FinalQuote `cbor:"2,keyasint,omitempty"`
}

// Record is one durable VM record with its place in the public log.
type Record struct {
	Seq   uint64 `cbor:"1,keyasint"`
	G     uint64 `cbor:"2,keyasint"` // global index within the VM's epoch
	Batch uint64 `cbor:"3,keyasint"`
	R     []byte `cbor:"4,keyasint"` // canonical record encoding
}

// FinalQuote is the post-mortem quote the bridge takes when a VM's teardown
// batch has been extended.
type FinalQuote struct {
	Epoch     uint64   `cbor:"1,keyasint"`
	Batch     uint64   `cbor:"2,keyasint"` // the last batch the quote covers
	Attest    []byte   `cbor:"3,keyasint"`
	Signature []byte   `cbor:"4,keyasint"`
	PCRs      []uint32 `cbor:"5,keyasint"`
	Values    [][]byte `cbor:"6,keyasint"`
}

// EpochInfo is what the store keeps about one epoch.
type EpochInfo struct {
	Number  uint64 `cbor:"1,keyasint"`
	Record  []byte `cbor:"2,keyasint"` // canonical epoch record
	Started int64  `cbor:"3,keyasint"`
	Ended   int64  `cbor:"4,keyasint,omitempty"` // when a later epoch replaced it
}

// Commit is everything one group commit makes durable at once.
type Commit struct {
	Epoch   uint64
	Index   uint64 // batch index within the epoch
	Batch   Batch
	Records []Put
	VMs     []VM // VM states to write (e.g. new NextSeq, Ended)
	// Opens are the VMs (IDs, among VMs) whose new segment this commit
	// opens (a migrated-in record): a stored, ended earlier segment of
	// the same VM is kept aside (Snapshot.Segments).
	Opens [][32]byte
}

// Put is one record to store under a VM.
type Put struct {
	ID [32]byte
	Record
}

// Store is an open log store. It is safe for concurrent use; bbolt allows
// one writer and many readers, and readers see consistent snapshots.
type Store struct {
	// mu is held shared by every transaction and exclusively by Compact,
	// which swaps db for a rewritten file while the store is in use. A
	// View callback must not call the Store again: with a Compact waiting,
	// the nested shared lock would wait for it, and it for the callback.
	mu   sync.RWMutex
	db   *bolt.DB
	bo   *bolt.Options
	path string
	opts Options

	walMu sync.Mutex // the write-ahead log has one writer at a time
	wal   *wal.Log
	// unbatched are the staged records Open found in no batch.
	unbatched     []Staged
	unbatchedFrom uint64
	released      uint64 // frames before it are applied (Release)
}

// view runs a read transaction.
func (s *Store) view(fn func(tx *bolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.db.View(fn)
}

// update runs a write transaction.
func (s *Store) update(fn func(tx *bolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.db.Update(fn)
}

// Options tune durability; the zero value is the safe default.
type Options struct {
	// NoSync skips fsync on commit and fdatasync in the write-ahead log.
	// Only tests and benchmarks that measure the rest of the pipeline set
	// it; a bridge never does.
	NoSync bool
	// WALSegmentSize is the size past which the write-ahead log starts a
	// new segment file; default wal.DefaultSegmentSize.
	WALSegmentSize int64
	// WALNoPreallocate makes write-ahead log segments grow with their
	// writes instead of being created zero-filled (wal.Options); for
	// benchmarks that compare the two.
	WALNoPreallocate bool
	// WALBeforeWrite and ApplyHook are crash-test hooks: called before a
	// group is written to the write-ahead log (with the file, the offset
	// and the bytes) and before batches are applied to bbolt.
	WALBeforeWrite func(f *os.File, off int64, b []byte)
	ApplyHook      func(cs []*Commit)
}

// WALDir is where the store at path keeps its write-ahead log.
func WALDir(path string) string { return path + ".wal" }

// Open opens (creating if needed, mode 0600) the store at path.
func Open(path string, opts *Options) (*Store, error) {
	bo := &bolt.Options{Timeout: 2 * time.Second, FreelistType: bolt.FreelistMapType}
	if opts != nil && opts.NoSync {
		bo.NoSync = true
	}
	db, err := bolt.Open(path, 0o600, bo)
	if err != nil {
		return nil, fmt.Errorf("open log store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketEpochs, bucketBatches, bucketVMs, bucketRecords, bucketFinal, bucketSegments} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keyFormat); v != nil {
			if len(v) != 8 || binary.BigEndian.Uint64(v) != formatVersion {
				return fmt.Errorf("store format %x, this bridge reads format %d", v, formatVersion)
			}
			return nil
		}
		return meta.Put(keyFormat, u64(formatVersion))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open log store %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		db.Close()
		return nil, fmt.Errorf("open log store %s: %w", path, err)
	}
	s := &Store{db: db, bo: bo, path: path}
	if opts != nil {
		s.opts = *opts
	}
	s.wal, err = wal.Open(WALDir(path), wal.Options{NoSync: s.opts.NoSync, SegmentSize: s.opts.WALSegmentSize, NoPreallocate: s.opts.WALNoPreallocate, BeforeWrite: s.opts.WALBeforeWrite})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open log store %s: %w", path, err)
	}
	if err := s.replayWAL(); err != nil {
		s.wal.Close()
		db.Close()
		return nil, fmt.Errorf("open log store %s: %w", path, err)
	}
	return s, nil
}

// Close closes the store.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.walMu.Lock()
	werr := s.wal.Close()
	s.walMu.Unlock()
	return errors.Join(s.db.Close(), werr)
}

// CurrentEpoch returns the newest epoch, or ok=false when none has begun.
func (s *Store) CurrentEpoch() (info EpochInfo, ok bool, err error) {
	err = s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(keyEpoch)
		if v == nil {
			return nil
		}
		if len(v) != 8 {
			return fmt.Errorf("corrupt current epoch key")
		}
		raw := tx.Bucket(bucketEpochs).Get(v)
		if raw == nil {
			return fmt.Errorf("current epoch %d has no entry", binary.BigEndian.Uint64(v))
		}
		if err := cbor.Unmarshal(raw, &info); err != nil {
			return fmt.Errorf("decode epoch %d: %w", binary.BigEndian.Uint64(v), err)
		}
		ok = true
		return nil
	})
	if err != nil {
		return EpochInfo{}, false, fmt.Errorf("read current epoch: %w", err)
	}
	return info, ok, nil
}

// BeginEpoch makes a new epoch current and commits its first batch (the one
// holding the epoch record) in the same transaction. The previous epoch is
// marked ended, and every VM still live in it is ended with reason
// "epoch-ended": its PCR history is gone, so it cannot continue.
func (s *Store) BeginEpoch(number uint64, epochRecord []byte, first Batch, now time.Time) error {
	err := s.update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		epochs := tx.Bucket(bucketEpochs)
		if prev := meta.Get(keyEpoch); prev != nil {
			var pi EpochInfo
			if err := cbor.Unmarshal(epochs.Get(prev), &pi); err != nil {
				return fmt.Errorf("decode previous epoch: %w", err)
			}
			if pi.Number >= number {
				return fmt.Errorf("epoch %d does not follow epoch %d", number, pi.Number)
			}
			pi.Ended = now.UnixNano()
			if err := putCBOR(epochs, u64(pi.Number), &pi); err != nil {
				return err
			}
			if err := endLiveVMs(tx, pi.Number, "epoch-ended"); err != nil {
				return err
			}
		}
		info := EpochInfo{Number: number, Record: epochRecord, Started: now.UnixNano()}
		if err := putCBOR(epochs, u64(number), &info); err != nil {
			return err
		}
		if err := meta.Put(keyEpoch, u64(number)); err != nil {
			return err
		}
		return putCBOR(tx.Bucket(bucketBatches), batchKey(number, 0), &first)
	})
	if err != nil {
		return fmt.Errorf("begin epoch %d: %w", number, err)
	}
	return nil
}

func endLiveVMs(tx *bolt.Tx, epoch uint64, why string) error {
	vms := tx.Bucket(bucketVMs)
	var ended []VM
	err := vms.ForEach(func(k, v []byte) error {
		var vm VM
		if err := cbor.Unmarshal(v, &vm); err != nil {
			return fmt.Errorf("decode vm %x: %w", k, err)
		}
		if vm.Epoch == epoch && !vm.Ended {
			vm.Ended, vm.EndedBy = true, why
			ended = append(ended, vm)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := range ended {
		if err := putCBOR(vms, ended[i].ID[:], &ended[i]); err != nil {
			return err
		}
	}
	return nil
}

// Commit makes one batch, its records and the VM state changes durable in
// one fsynced transaction. For a VM of c.Opens whose stored state is
// another segment (it came back by live migration), the stored segment,
// which must have ended, is kept with its final quote (Snapshot.Segments)
// in the same transaction.
func (s *Store) Commit(c *Commit) error {
	err := s.update(func(tx *bolt.Tx) error { return commitTx(tx, c) })
	if err != nil {
		return fmt.Errorf("commit batch %d of epoch %d: %w", c.Index, c.Epoch, err)
	}
	return nil
}

// commitTx writes commit c in transaction tx.
func commitTx(tx *bolt.Tx, c *Commit) error {
	batches := tx.Bucket(bucketBatches)
	key := batchKey(c.Epoch, c.Index)
	if batches.Get(key) != nil {
		return fmt.Errorf("batch %d of epoch %d already exists", c.Index, c.Epoch)
	}
	if err := putCBOR(batches, key, &c.Batch); err != nil {
		return err
	}
	if err := putRecords(tx.Bucket(bucketRecords), c.Records); err != nil {
		return err
	}
	vms := tx.Bucket(bucketVMs)
	for i := range c.VMs {
		if slices.Contains(c.Opens, c.VMs[i].ID) {
			if err := archiveSegment(tx, &c.VMs[i]); err != nil {
				return err
			}
		}
		if err := putCBOR(vms, c.VMs[i].ID[:], &c.VMs[i]); err != nil {
			return err
		}
	}
	return nil
}

// archiveSegment moves the stored segment of next's VM, if it is another
// segment than next (another FirstSeq), to the segments bucket with its
// final quote. A segment that has not ended is never replaced.
func archiveSegment(tx *bolt.Tx, next *VM) error {
	raw := tx.Bucket(bucketVMs).Get(next.ID[:])
	if raw == nil {
		return nil
	}
	var old VM
	if err := cbor.Unmarshal(raw, &old); err != nil {
		return fmt.Errorf("decode vm %x: %w", next.ID[:8], err)
	}
	if old.FirstSeq == next.FirstSeq {
		return nil
	}
	if !old.Ended || next.FirstSeq < old.NextSeq {
		return fmt.Errorf("vm %s: a segment from record %d cannot replace the one from record %d (ended %v, %d records)", old.Name, next.FirstSeq, old.FirstSeq, old.Ended, old.NextSeq)
	}
	seg := Segment{VM: old}
	finals := tx.Bucket(bucketFinal)
	if v := finals.Get(next.ID[:]); v != nil {
		seg.Final = new(FinalQuote)
		if err := cbor.Unmarshal(v, seg.Final); err != nil {
			return fmt.Errorf("decode final quote: %w", err)
		}
		if err := finals.Delete(next.ID[:]); err != nil {
			return err
		}
	}
	return putCBOR(tx.Bucket(bucketSegments), recordKey(next.ID, old.FirstSeq), &seg)
}

// PutFinal stores the post-mortem quote of VM id.
func (s *Store) PutFinal(id [32]byte, q *FinalQuote) error {
	err := s.update(func(tx *bolt.Tx) error {
		return putCBOR(tx.Bucket(bucketFinal), id[:], q)
	})
	if err != nil {
		return fmt.Errorf("store final quote: %w", err)
	}
	return nil
}

// View runs fn on a consistent read-only snapshot of the store. fn must
// not call the Store (see Store.mu).
func (s *Store) View(fn func(*Snapshot) error) error {
	return s.view(func(tx *bolt.Tx) error { return fn(&Snapshot{tx: tx}) })
}

// Snapshot is a consistent read-only view of the store, valid only inside
// the View callback that made it.
type Snapshot struct {
	tx *bolt.Tx
}

// Batches calls fn for each batch of epoch from index from on, in order.
// The Batch passed to fn is only valid during the call.
func (sn *Snapshot) Batches(epoch, from uint64, fn func(index uint64, b *Batch) error) error {
	c := sn.tx.Bucket(bucketBatches).Cursor()
	prefix := u64(epoch)
	var b Batch
	for k, v := c.Seek(batchKey(epoch, from)); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if len(k) != 16 {
			return fmt.Errorf("corrupt batch key %x", k)
		}
		b = Batch{}
		if err := cbor.Unmarshal(v, &b); err != nil {
			return fmt.Errorf("decode batch %x: %w", k, err)
		}
		if err := fn(binary.BigEndian.Uint64(k[8:]), &b); err != nil {
			return err
		}
	}
	return nil
}

// VM returns the state of VM id.
func (sn *Snapshot) VM(id [32]byte) (*VM, error) {
	v := sn.tx.Bucket(bucketVMs).Get(id[:])
	if v == nil {
		return nil, fmt.Errorf("vm %x: %w", id[:8], ErrNotFound)
	}
	var vm VM
	if err := cbor.Unmarshal(v, &vm); err != nil {
		return nil, fmt.Errorf("decode vm %x: %w", id[:8], err)
	}
	return &vm, nil
}

// VMs calls fn for every VM instance the store knows.
func (sn *Snapshot) VMs(fn func(*VM) error) error {
	return sn.tx.Bucket(bucketVMs).ForEach(func(k, v []byte) error {
		var vm VM
		if err := cbor.Unmarshal(v, &vm); err != nil {
			return fmt.Errorf("decode vm %x: %w", k, err)
		}
		return fn(&vm)
	})
}

// Records calls fn for VM id's records from seq from on, in order.
func (sn *Snapshot) Records(id [32]byte, from uint64, fn func(*Record) error) error {
	c := sn.tx.Bucket(bucketRecords).Cursor()
	for k, v := c.Seek(recordKey(id, from)); k != nil && bytes.HasPrefix(k, id[:]); k, v = c.Next() {
		var r Record
		if err := cbor.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("decode record %x: %w", k, err)
		}
		if err := fn(&r); err != nil {
			return err
		}
	}
	return nil
}

// Segments calls fn for VM id's earlier, ended segments on this host,
// oldest first (the current one is VM(id)).
func (sn *Snapshot) Segments(id [32]byte, fn func(*Segment) error) error {
	c := sn.tx.Bucket(bucketSegments).Cursor()
	for k, v := c.Seek(id[:]); k != nil && bytes.HasPrefix(k, id[:]); k, v = c.Next() {
		var seg Segment
		if err := cbor.Unmarshal(v, &seg); err != nil {
			return fmt.Errorf("decode segment %x: %w", k, err)
		}
		if err := fn(&seg); err != nil {
			return err
		}
	}
	return nil
}

// Final returns the post-mortem quote of VM id.
func (sn *Snapshot) Final(id [32]byte) (*FinalQuote, error) {
	v := sn.tx.Bucket(bucketFinal).Get(id[:])
	if v == nil {
		return nil, fmt.Errorf("final quote of vm %x: %w", id[:8], ErrNotFound)
	}
	var q FinalQuote
	if err := cbor.Unmarshal(v, &q); err != nil {
		return nil, fmt.Errorf("decode final quote: %w", err)
	}
	return &q, nil
}

// Epoch returns what the store keeps about epoch number.
func (sn *Snapshot) Epoch(number uint64) (*EpochInfo, error) {
	v := sn.tx.Bucket(bucketEpochs).Get(u64(number))
	if v == nil {
		return nil, fmt.Errorf("epoch %d: %w", number, ErrNotFound)
	}
	var e EpochInfo
	if err := cbor.Unmarshal(v, &e); err != nil {
		return nil, fmt.Errorf("decode epoch %d: %w", number, err)
	}
	return &e, nil
}

func putCBOR(b *bolt.Bucket, key []byte, v any) error {
	raw, err := cbor.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %T: %w", v, err)
	}
	return b.Put(key, raw)
}

func u64(v uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	return b[:]
}

func batchKey(epoch, index uint64) []byte {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], epoch)
	binary.BigEndian.PutUint64(b[8:], index)
	return b[:]
}

func recordKey(id [32]byte, seq uint64) []byte {
	var b [40]byte
	copy(b[:32], id[:])
	binary.BigEndian.PutUint64(b[32:], seq)
	return b[:]
}

// LastRecords calls fn for VM id's records from the newest back, until fn
// returns false.
func (sn *Snapshot) LastRecords(id [32]byte, fn func(*Record) bool) error {
	c := sn.tx.Bucket(bucketRecords).Cursor()
	k, v := c.Seek(recordKey(id, ^uint64(0)))
	if k == nil || !bytes.HasPrefix(k, id[:]) {
		k, v = c.Prev()
	}
	for ; k != nil && bytes.HasPrefix(k, id[:]); k, v = c.Prev() {
		var r Record
		if err := cbor.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("decode record %x: %w", k, err)
		}
		if !fn(&r) {
			return nil
		}
	}
	return nil
}

// SealedDataKey returns the sealed data key blob, or nil if none was stored.
func (s *Store) SealedDataKey() ([]byte, error) {
	var out []byte
	err := s.view(func(tx *bolt.Tx) error {
		out = bytes.Clone(tx.Bucket(bucketMeta).Get(keyDataKey))
		return nil
	})
	return out, err
}

// PutSealedDataKey stores the sealed data key blob once; a second, different
// one is refused, since every wrapped VM key depends on the first.
func (s *Store) PutSealedDataKey(blob []byte) error {
	err := s.update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if old := meta.Get(keyDataKey); old != nil && !bytes.Equal(old, blob) {
			return errors.New("the store already has a data key")
		}
		return meta.Put(keyDataKey, blob)
	})
	if err != nil {
		return fmt.Errorf("store sealed data key: %w", err)
	}
	return nil
}

// Forget destroys an ended VM's key, records, final quote, earlier
// segments and chain and marks it forgotten. Its leaves stay in the public log, unlinkable. bbolt reuses
// freed pages but does not wipe them: Compact leaves no copy in the file
// (the multiplexer's ForgetExpired runs it).
func (s *Store) Forget(id [32]byte) error {
	err := s.update(func(tx *bolt.Tx) error {
		vms := tx.Bucket(bucketVMs)
		raw := vms.Get(id[:])
		if raw == nil {
			return fmt.Errorf("vm %x: %w", id[:8], ErrNotFound)
		}
		var vm VM
		if err := cbor.Unmarshal(raw, &vm); err != nil {
			return err
		}
		if !vm.Ended {
			return fmt.Errorf("vm %s has not ended", vm.Name)
		}
		c := tx.Bucket(bucketRecords).Cursor()
		for k, _ := c.Seek(id[:]); k != nil && bytes.HasPrefix(k, id[:]); k, _ = c.Seek(id[:]) {
			if err := c.Delete(); err != nil {
				return err
			}
		}
		if err := tx.Bucket(bucketFinal).Delete(id[:]); err != nil {
			return err
		}
		sc := tx.Bucket(bucketSegments).Cursor()
		for k, _ := sc.Seek(id[:]); k != nil && bytes.HasPrefix(k, id[:]); k, _ = sc.Seek(id[:]) {
			if err := sc.Delete(); err != nil {
				return err
			}
		}
		vm.Key, vm.WrappedKey, vm.Forgotten, vm.Chain = [32]byte{}, nil, true, nil
		return putCBOR(vms, id[:], &vm)
	})
	if err != nil {
		return fmt.Errorf("forget vm %x: %w", id[:8], err)
	}
	return nil
}

// Compact rewrites the store into a fresh file and replaces the old one,
// so that pages freed by Forget leave no copy in the state directory, and
// deletes the write-ahead log segments whose frames are all applied (they
// may hold a forgotten VM's records). It may run while the store is in
// use: transactions wait for it. A crash leaves either file whole (the new
// one is renamed over the old).
func (s *Store) Compact() error {
	if err := s.dropAppliedWAL(); err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	tmp := s.path + ".compact"
	os.Remove(tmp)
	dst, err := bolt.Open(tmp, 0o600, nil)
	if err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	if err := bolt.Compact(dst, s.db, 1<<20); err != nil {
		dst.Close()
		os.Remove(tmp)
		return fmt.Errorf("compact: %w", err)
	}
	if err := dst.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("compact: %w", err)
	}
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("compact: %w", err)
	}
	renameErr := os.Rename(tmp, s.path)
	if renameErr == nil {
		syncDir(filepath.Dir(s.path))
	} else {
		os.Remove(tmp)
	}
	// Reopen whichever file is in place, so the store stays usable.
	db, err := bolt.Open(s.path, 0o600, s.bo)
	if err != nil {
		return fmt.Errorf("compact: reopen %s: %w", s.path, err)
	}
	s.db = db
	if renameErr != nil {
		return fmt.Errorf("compact: %w", renameErr)
	}
	return nil
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// recordsFill is how full bbolt packs a records page it splits. Each VM's
// records are only ever appended after its last one, so a split page is not
// written into again except at its end, and bbolt's default of half full
// would write (and fsync) about twice the pages per batch.
const recordsFill = 0.9

// putRecords stores a batch's records. It is the log store's hot path (one
// call per group commit, thousands of records): the keys and values of the
// whole batch are encoded into one buffer (bbolt keeps the slices until the
// transaction ends), and records are put in key order, so bbolt's cursor
// walks the tree forwards instead of jumping between VMs.
func putRecords(b *bolt.Bucket, puts []Put) error {
	b.FillPercent = recordsFill
	size := 0
	for i := range puts {
		size += 40 + recordSize(&puts[i].Record)
	}
	buf := make([]byte, 0, size)
	order := make([]int32, len(puts))
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortStableFunc(order, func(x, y int32) int {
		return bytes.Compare(puts[x].ID[:], puts[y].ID[:])
	})
	for _, i := range order {
		p := &puts[i]
		k := len(buf)
		buf = append(buf, p.ID[:]...)
		buf = binary.BigEndian.AppendUint64(buf, p.Seq)
		v := len(buf)
		buf = appendRecord(buf, &p.Record)
		if err := b.Put(buf[k:v:v], buf[v:len(buf):len(buf)]); err != nil {
			return err
		}
	}
	return nil
}

// appendRecord appends the CBOR encoding of r, byte for byte what
// cbor.Marshal writes for it (a map of four integer keys in field order).
func appendRecord(b []byte, r *Record) []byte {
	b = append(b, 0xa4, 0x01)
	b = canon.AppendHead(b, 0, r.Seq)
	b = append(b, 0x02)
	b = canon.AppendHead(b, 0, r.G)
	b = append(b, 0x03)
	b = canon.AppendHead(b, 0, r.Batch)
	b = append(b, 0x04)
	if r.R == nil {
		return append(b, 0xf6) // cbor.Marshal's nil byte slice
	}
	b = canon.AppendHead(b, 2, uint64(len(r.R)))
	return append(b, r.R...)
}

func recordSize(r *Record) int { return 5 + 4*9 + len(r.R) }
