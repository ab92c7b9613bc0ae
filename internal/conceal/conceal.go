// Package conceal holds the cryptographic core of tpmmux protocol v1: the
// per-VM identity and keys, the concealed tag and commitment of each record,
// the public leaf, and the batch digest that is extended into the TPM.
//
// The bridge and the verifier both compute these values with this package, so
// the two sides compute one thing one way (docs/protocol.md states the
// construction).
package conceal

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"hash"
)

// Domain-separation labels of protocol v1. Each is hashed or MACed as ASCII
// in front of its input so no value of one kind can stand for another.
const (
	LabelTag     = "tpmmux/v1/tag"
	LabelConceal = "tpmmux/v1/conceal"
	LabelID      = "tpmmux/v1/id"
	LabelLeaf    = "tpmmux/v1/leaf"
	LabelBatch   = "tpmmux/v1/batch"
	LabelEpoch   = "tpmmux/v1/epoch"
	LabelNonce   = "tpmmux/v1/nonce"
	LabelFinal   = "tpmmux/v1/final"
)

// DefaultPCR is the PCR the bridge anchors in and the verifier expects by
// default: PCR 13, which only a TPM Reset (host reboot) resets and which
// nothing extends after the host kernel starts on a typical libvirt host
// (docs/protocol.md "Choosing the PCR").
const DefaultPCR = 13

// Digest is a SHA-256 value.
type Digest = [32]byte

// Key is a VM's 32-byte concealment secret K. Whoever holds it can find and
// check that VM's records in the public log; nobody else can.
type Key [32]byte

// ID derives the public VM instance identifier
// id = H("tpmmux/v1/id" || vm_uuid || instance).
func ID(uuid, instance [16]byte) Digest {
	h := sha256.New()
	h.Write([]byte(LabelID))
	h.Write(uuid[:])
	h.Write(instance[:])
	return sum(h)
}

// Keys are the two keys derived from K: K_tag locates records, K_mac commits
// to their content. They keep pre-computed HMAC states so the hot path does
// not rebuild the key schedule for every record. A Keys is not safe for
// concurrent use; derive one per goroutine.
type Keys struct {
	tag *hmacState
	mac *hmacState
}

// Derive computes K_tag = HMAC(K, "tpmmux/v1/tag") and
// K_mac = HMAC(K, "tpmmux/v1/conceal").
func Derive(k Key) *Keys {
	return &Keys{
		tag: newHMACState(hmacOnce(k[:], []byte(LabelTag))),
		mac: newHMACState(hmacOnce(k[:], []byte(LabelConceal))),
	}
}

// Tag computes t_s = HMAC(K_tag, u64(s)): the pseudo-random label under which
// record s of this VM sits in the public log.
func (k *Keys) Tag(s uint64) Digest {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], s)
	return k.tag.mac(b[:])
}

// Commit computes c_s = HMAC(K_mac, id || u64(s) || H(R_s)): the concealed
// commitment binding record s's content to this VM instance and position.
func (k *Keys) Commit(id Digest, s uint64, recordHash Digest) Digest {
	var b [32 + 8 + 32]byte
	copy(b[:32], id[:])
	binary.BigEndian.PutUint64(b[32:40], s)
	copy(b[40:], recordHash[:])
	return k.mac.mac(b[:])
}

// Leaf computes leaf = H("tpmmux/v1/leaf" || t || c), the value a VM record
// contributes to its batch.
func Leaf(t, c Digest) Digest {
	var b [len(LabelLeaf) + 64]byte
	n := copy(b[:], LabelLeaf)
	n += copy(b[n:], t[:])
	copy(b[n:], c[:])
	return sha256.Sum256(b[:])
}

// EpochLeaf computes H("tpmmux/v1/epoch" || R_epoch), the leaf of the public
// epoch record that opens every epoch at global index 0.
func EpochLeaf(epochRecord []byte) Digest {
	h := sha256.New()
	h.Write([]byte(LabelEpoch))
	h.Write(epochRecord)
	return sum(h)
}

// BatchHasher accumulates
// v_b = H("tpmmux/v1/batch" || u64(g0) || u32(n) || leaf_g0 || … ).
// The count n is part of the prefix, so it must be known before the leaves
// are added; Sum checks that exactly n leaves were written.
type BatchHasher struct {
	h    hash.Hash
	n    uint32
	seen uint32
}

// NewBatchHasher starts the digest of a batch of n leaves from global index g0.
func NewBatchHasher(g0 uint64, n uint32) *BatchHasher {
	h := sha256.New()
	var b [len(LabelBatch) + 12]byte
	k := copy(b[:], LabelBatch)
	binary.BigEndian.PutUint64(b[k:], g0)
	binary.BigEndian.PutUint32(b[k+8:], n)
	h.Write(b[:])
	return &BatchHasher{h: h, n: n}
}

// Add appends the next leaf.
func (b *BatchHasher) Add(leaf Digest) {
	b.h.Write(leaf[:])
	b.seen++
}

// Sum returns v_b; ok is false when the number of leaves added differs from n.
func (b *BatchHasher) Sum() (v Digest, ok bool) {
	return sum(b.h), b.seen == b.n
}

// BatchDigest computes v_b for the leaves from global index g0.
func BatchDigest(g0 uint64, leaves []Digest) Digest {
	bh := NewBatchHasher(g0, uint32(len(leaves)))
	for _, l := range leaves {
		bh.Add(l)
	}
	v, _ := bh.Sum()
	return v
}

// ExtendPCR returns H(pcr || v), the value of a SHA-256 PCR after
// TPM2_PCR_Extend(v).
func ExtendPCR(pcr, v Digest) Digest {
	var b [64]byte
	copy(b[:32], pcr[:])
	copy(b[32:], v[:])
	return sha256.Sum256(b[:])
}

// NonceData computes the quote extraData for VM id and verifier nonce N:
// H("tpmmux/v1/nonce" || N || id). Binding id into it means a quote made for
// VM A's verifier cannot be presented as fresh evidence for VM B.
func NonceData(nonce []byte, id Digest) Digest {
	h := sha256.New()
	h.Write([]byte(LabelNonce))
	h.Write(nonce)
	h.Write(id[:])
	return sum(h)
}

// FinalData computes the extraData of a VM's post-mortem quote:
// H("tpmmux/v1/final" || id || H(R_teardown)).
func FinalData(id, teardownHash Digest) Digest {
	h := sha256.New()
	h.Write([]byte(LabelFinal))
	h.Write(id[:])
	h.Write(teardownHash[:])
	return sum(h)
}

func sum(h hash.Hash) Digest {
	var d Digest
	h.Sum(d[:0])
	return d
}

func hmacOnce(key, msg []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(msg)
	return m.Sum(nil)
}
