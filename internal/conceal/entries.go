package conceal

import "fmt"

// EntrySize is the size of one public log entry, a record's tag t followed
// by its commitment c. The bridge's store, the evidence format and the
// verifier all hold a batch's entries as a concatenation of these.
const EntrySize = 2 * len(Digest{})

// EntryCount returns how many whole t||c entries entries holds.
func EntryCount(entries []byte) int { return len(entries) / EntrySize }

// EntryAt returns the tag and commitment of entry i of concatenated t||c
// entries.
func EntryAt(entries []byte, i int) (t, c Digest) {
	copy(t[:], entries[i*EntrySize:])
	copy(c[:], entries[i*EntrySize+len(Digest{}):])
	return t, c
}

// BatchValue recomputes the digest v_b of the batch that starts at global
// index g0 from its public content: the epoch record's leaf first when g0
// is 0 (it takes global index 0), then the leaf of each t||c entry. It
// returns v_b and the batch's leaf count n, so a caller can compare n with
// what the batch claims and v_b with what was extended. The bridge's replay
// of its store and the verifier's replay of evidence both use it, so the two
// cannot disagree about how a batch is hashed.
func BatchValue(g0 uint64, epochRecord, entries []byte) (v Digest, n uint32, err error) {
	if len(entries)%EntrySize != 0 {
		return v, 0, fmt.Errorf("entries are %d bytes, not a multiple of %d", len(entries), EntrySize)
	}
	count := EntryCount(entries)
	epochLeaf := g0 == 0
	if epochLeaf {
		count++
	}
	if uint64(count) > 1<<32-1 {
		return v, 0, fmt.Errorf("batch of %d leaves exceeds the 32-bit leaf count", count)
	}
	n = uint32(count)
	bh := NewBatchHasher(g0, n)
	if epochLeaf {
		bh.Add(EpochLeaf(epochRecord))
	}
	for i := range EntryCount(entries) {
		bh.Add(Leaf(EntryAt(entries, i)))
	}
	v, _ = bh.Sum()
	return v, n, nil
}
