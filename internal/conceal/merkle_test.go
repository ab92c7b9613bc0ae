package conceal

import "testing"

func TestMerkle(t *testing.T) {
	for n := 1; n <= 33; n++ {
		vals := make([]Digest, n)
		for i := range vals {
			vals[i] = Digest{byte(i), byte(n)}
		}
		root, paths := MerkleRoot(vals)
		for i := range vals {
			got, ok := MerkleVerify(vals[i], uint64(i), uint64(n), paths[i])
			if !ok || got != root {
				t.Fatalf("n=%d leaf %d does not verify", n, i)
			}
			// The path proves this leaf at this index only.
			if n > 1 {
				if got, ok := MerkleVerify(vals[i], uint64((i+1)%n), uint64(n), paths[i]); ok && got == root {
					t.Fatalf("n=%d leaf %d verifies at index %d", n, i, (i+1)%n)
				}
				other := vals[(i+1)%n]
				if got, _ := MerkleVerify(other, uint64(i), uint64(n), paths[i]); got == root {
					t.Fatalf("n=%d: another value verifies with leaf %d's path", n, i)
				}
			}
		}
	}
	if _, ok := MerkleVerify(Digest{}, 3, 3, nil); ok {
		t.Fatal("index beyond count accepted")
	}
	// A one-leaf tree's root is the hashed leaf, never the raw value: a
	// batched quote cannot be confused with a plain one.
	root, _ := MerkleRoot([]Digest{{9}})
	if root == (Digest{9}) {
		t.Fatal("root equals the raw leaf")
	}
}

// TestMerkleTree: the tree built level by level from hashed leaves has
// MerkleRoot's root and paths for every size up to 300 and a few larger,
// and every path verifies.
func TestMerkleTree(t *testing.T) {
	for _, n := range append(seq(1, 300), 511, 512, 513, 1000, 4095, 4096) {
		values := make([]Digest, n)
		hashed := make([]Digest, n)
		for i := range values {
			values[i] = Digest{byte(i), byte(i >> 8), byte(n)}
			hashed[i] = MerkleLeaf(values[i])
		}
		root, paths := MerkleRoot(values)
		tree := NewMerkleTree(hashed)
		if tree.Root() != root {
			t.Fatalf("%d leaves: root differs from MerkleRoot's", n)
		}
		for i := range values {
			p := tree.Path(i)
			if len(p) != len(paths[i]) {
				t.Fatalf("%d leaves, leaf %d: path of %d, MerkleRoot's %d", n, i, len(p), len(paths[i]))
			}
			for k := range p {
				if p[k] != paths[i][k] {
					t.Fatalf("%d leaves, leaf %d: path differs at %d", n, i, k)
				}
			}
			if got, ok := MerkleVerify(values[i], uint64(i), uint64(n), p); !ok || got != root {
				t.Fatalf("%d leaves, leaf %d: path does not verify", n, i)
			}
		}
	}
}

func seq(a, b int) []int {
	var out []int
	for i := a; i <= b; i++ {
		out = append(out, i)
	}
	return out
}
