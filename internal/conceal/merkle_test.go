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
