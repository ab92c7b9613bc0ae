package canon

import (
	"bytes"
	"testing"
)

// TestAppendHead: the head AppendHead writes is the one the canonical
// encoder writes, at every boundary of the argument's width, for unsigned
// integers (major 0), byte strings (2) and maps (5).
func TestAppendHead(t *testing.T) {
	enc := Enc()
	for _, v := range []uint64{0, 1, 23, 24, 255, 256, 65535, 65536, 1<<32 - 1, 1 << 32, 1<<64 - 1} {
		want, err := enc.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if got := AppendHead(nil, 0, v); !bytes.Equal(got, want) {
			t.Errorf("AppendHead(0, %d) = %x, want %x", v, got, want)
		}
	}
	for _, n := range []int{0, 23, 24, 255, 256, 70000} {
		want, err := enc.Marshal(make([]byte, n))
		if err != nil {
			t.Fatal(err)
		}
		if got := AppendHead(nil, 2, uint64(n)); !bytes.Equal(got, want[:len(want)-n]) {
			t.Errorf("AppendHead(2, %d) = %x, want %x", n, got, want[:len(want)-n])
		}
	}
	m := map[uint64]bool{}
	for i := range uint64(30) {
		m[i] = true
	}
	want, err := enc.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if got := AppendHead(nil, 5, 30); !bytes.HasPrefix(want, got) || len(got) != 2 {
		t.Errorf("AppendHead(5, 30) = %x, want the head of %x", got, want[:4])
	}
}
