package conceal

import "crypto/sha256"

// Merkle trees over quote requests (RFC 6962 §2.1 shape: leaves and inner
// nodes are domain-separated by a prefix byte, and a tree of n leaves splits
// at the largest power of two below n). When many verifiers ask at once, the
// bridge takes one quote whose extraData is the root over their
// H("tpmmux/v1/nonce" || N || id) values, and each gets its leaf's path.

// MerkleLeaf hashes one leaf: H(0x00 || d).
func MerkleLeaf(d Digest) Digest {
	var b [33]byte
	copy(b[1:], d[:])
	return sha256.Sum256(b[:])
}

func merkleNode(l, r Digest) Digest {
	var b [65]byte
	b[0] = 1
	copy(b[1:33], l[:])
	copy(b[33:], r[:])
	return sha256.Sum256(b[:])
}

// MerkleRoot returns the root over leaves (each hashed with MerkleLeaf) and
// every leaf's audit path, bottom-up.
func MerkleRoot(values []Digest) (Digest, [][]Digest) {
	paths := make([][]Digest, len(values))
	idx := make([]int, len(values))
	for i := range idx {
		idx[i] = i
	}
	hashed := make([]Digest, len(values))
	for i, v := range values {
		hashed[i] = MerkleLeaf(v)
	}
	return merkleTree(hashed, idx, paths), paths
}

func merkleTree(nodes []Digest, idx []int, paths [][]Digest) Digest {
	if len(nodes) == 1 {
		return nodes[0]
	}
	k := 1
	for k*2 < len(nodes) {
		k *= 2
	}
	l := merkleTree(nodes[:k], idx[:k], paths)
	r := merkleTree(nodes[k:], idx[k:], paths)
	for _, i := range idx[:k] {
		paths[i] = append(paths[i], r)
	}
	for _, i := range idx[k:] {
		paths[i] = append(paths[i], l)
	}
	return merkleNode(l, r)
}

// MerkleVerify computes the root that value at index of a tree of count
// leaves with audit path leads to; ok is false when the path has the wrong
// length for that position.
func MerkleVerify(value Digest, index, count uint64, path []Digest) (root Digest, ok bool) {
	if index >= count {
		return Digest{}, false
	}
	h := MerkleLeaf(value)
	// Walk down from the top to learn, per level, whether the leaf went
	// left or right, then fold the path bottom-up.
	type step struct{ right bool }
	var steps []step
	lo, n := index, count
	for n > 1 {
		k := uint64(1)
		for k*2 < n {
			k *= 2
		}
		if lo < k {
			steps = append(steps, step{right: false})
			n = k
		} else {
			steps = append(steps, step{right: true})
			lo -= k
			n -= k
		}
	}
	if len(steps) != len(path) {
		return Digest{}, false
	}
	for i := range path {
		s := steps[len(steps)-1-i]
		if s.right {
			h = merkleNode(path[i], h)
		} else {
			h = merkleNode(h, path[i])
		}
	}
	return h, true
}

// MerkleTree is the tree MerkleRoot builds, kept level by level so that
// each leaf's audit path can be read out later (Path), by whoever needs
// it, instead of every path being built at once. The leaves are given
// hashed (MerkleLeaf), so they can be hashed as the requests arrive. An
// RFC 6962 tree built level by level pairs neighbours and carries an odd
// last node up unchanged: the same root and paths as the split at the
// largest power of two.
type MerkleTree struct {
	levels [][]Digest // levels[0] the hashed leaves, the last the root
}

// NewMerkleTree builds the tree over hashed leaves (at least one).
func NewMerkleTree(hashed []Digest) *MerkleTree {
	t := &MerkleTree{levels: [][]Digest{hashed}}
	for l := hashed; len(l) > 1; {
		next := make([]Digest, (len(l)+1)/2)
		for j := range len(l) / 2 {
			next[j] = merkleNode(l[2*j], l[2*j+1])
		}
		if len(l)%2 == 1 {
			next[len(next)-1] = l[len(l)-1]
		}
		t.levels = append(t.levels, next)
		l = next
	}
	return t
}

// Root returns the tree's root.
func (t *MerkleTree) Root() Digest { return t.levels[len(t.levels)-1][0] }

// Path returns leaf i's audit path, bottom-up, as MerkleRoot gives it.
func (t *MerkleTree) Path(i int) []Digest {
	path := make([]Digest, 0, len(t.levels)-1)
	for _, l := range t.levels[:len(t.levels)-1] {
		if s := i ^ 1; s < len(l) {
			path = append(path, l[s])
		}
		i >>= 1
	}
	return path
}
