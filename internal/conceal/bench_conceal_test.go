package conceal

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"testing"
)

// The per-record cost of concealment on the bridge's hot path: one tag,
// one commitment, one leaf, and the leaf's share of the batch digest.

func BenchmarkTag(b *testing.B) {
	k := Derive(Key{1})
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		_ = k.Tag(uint64(i))
	}
}

func BenchmarkCommit(b *testing.B) {
	k := Derive(Key{1})
	id, rh := Digest{2}, Digest{3}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		_ = k.Commit(id, uint64(i), rh)
	}
}

func BenchmarkLeaf(b *testing.B) {
	t, c := Digest{1}, Digest{2}
	b.ReportAllocs()
	for b.Loop() {
		_ = Leaf(t, c)
	}
}

// BenchmarkBatchDigest reports the cost per leaf of v_b for batches of
// typical sizes (the verifier replays this for every batch).
func BenchmarkBatchDigest(b *testing.B) {
	for _, n := range []int{1, 64, 8192} {
		b.Run(fmt.Sprintf("leaves=%d", n), func(b *testing.B) {
			leaves := make([]Digest, n)
			for i := range leaves {
				leaves[i][0] = byte(i)
			}
			b.ReportAllocs()
			for b.Loop() {
				_ = BatchDigest(1, leaves)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/leaf")
		})
	}
}

// BenchmarkMerkleRoot is the bridge's cost of sharing one quote among n
// concurrent evidence requests.
func BenchmarkMerkleRoot(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("requests=%d", n), func(b *testing.B) {
			vals := make([]Digest, n)
			for i := range vals {
				vals[i][0], vals[i][1] = byte(i), byte(i>>8)
			}
			b.ReportAllocs()
			for b.Loop() {
				MerkleRoot(vals)
			}
		})
	}
}

// TestHMACStateMatchesHMAC pins the allocation-free HMAC of the hot path to
// crypto/hmac, for keys of every length class and messages up to the
// longest one Keys MACs.
func TestHMACStateMatchesHMAC(t *testing.T) {
	for _, klen := range []int{0, 1, 32, 63, 64, 65, 200} {
		key := make([]byte, klen)
		for i := range key {
			key[i] = byte(i*7 + klen)
		}
		s := newHMACState(key)
		for mlen := 0; mlen <= maxHMACMsg; mlen++ {
			msg := make([]byte, mlen)
			for i := range msg {
				msg[i] = byte(i ^ mlen)
			}
			m := hmac.New(sha256.New, key)
			m.Write(msg)
			if got, want := s.mac(msg), m.Sum(nil); !bytes.Equal(got[:], want) {
				t.Fatalf("key %d bytes, message %d bytes: %x, crypto/hmac %x", klen, mlen, got, want)
			}
		}
	}
}
