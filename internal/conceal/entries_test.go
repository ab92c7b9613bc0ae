package conceal

import (
	"bytes"
	"strings"
	"testing"
)

// TestBatchValue checks the shared replay of one batch against the digest
// computed leaf by leaf: the epoch leaf leads only a batch at global index
// 0, every entry's leaf follows in order, and a torn entry is an error.
func TestBatchValue(t *testing.T) {
	epoch := []byte{0xa1, 0x01, 0x02}
	ks := Derive(Key{5})
	var entries []byte
	var leaves []Digest
	for s := range uint64(3) {
		tag, c := ks.Tag(s), ks.Commit(Digest{1}, s, Digest{byte(s)})
		entries = append(append(entries, tag[:]...), c[:]...)
		leaves = append(leaves, Leaf(tag, c))
	}
	tests := []struct {
		name    string
		g0      uint64
		entries []byte
		want    Digest
		n       uint32
		err     string
	}{
		{name: "first batch carries the epoch leaf", g0: 0, entries: entries, want: BatchDigest(0, append([]Digest{EpochLeaf(epoch)}, leaves...)), n: 4},
		{name: "later batch", g0: 9, entries: entries, want: BatchDigest(9, leaves), n: 3},
		{name: "epoch record alone", g0: 0, entries: nil, want: BatchDigest(0, []Digest{EpochLeaf(epoch)}), n: 1},
		{name: "empty later batch", g0: 4, entries: nil, want: BatchDigest(4, nil), n: 0},
		{name: "torn entry", g0: 9, entries: entries[:EntrySize+1], err: "not a multiple of 64"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, n, err := BatchValue(tc.g0, epoch, tc.entries)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if v != tc.want || n != tc.n {
				t.Fatalf("BatchValue = %x, %d; want %x, %d", v[:8], n, tc.want[:8], tc.n)
			}
		})
	}
	// A changed, moved or dropped entry changes v.
	swapped := bytes.Clone(entries)
	copy(swapped, entries[EntrySize:2*EntrySize])
	copy(swapped[EntrySize:], entries[:EntrySize])
	if v, _, _ := BatchValue(9, epoch, swapped); v == BatchDigest(9, leaves) {
		t.Fatal("swapping two entries did not change the batch value")
	}
}

func TestEntryAt(t *testing.T) {
	e := make([]byte, 2*EntrySize)
	e[EntrySize] = 7    // entry 1's tag
	e[EntrySize+32] = 8 // entry 1's commitment
	tag, c := EntryAt(e, 1)
	if tag[0] != 7 || c[0] != 8 || EntryCount(e) != 2 {
		t.Fatalf("EntryAt(1) = %x, %x; count %d", tag[:1], c[:1], EntryCount(e))
	}
}
