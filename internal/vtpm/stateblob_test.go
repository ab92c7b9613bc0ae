package vtpm

import (
	"bytes"
	"testing"
)

// FuzzStateBlob: a state blob comes from QEMU's migration stream. The
// parser never panics, and what it accepts re-encodes to the same bytes.
func FuzzStateBlob(f *testing.F) {
	f.Add(uint32(1), stateBlob{Type: blobPermanent}.marshal())
	f.Add(uint32(2), stateBlob{Type: blobVolatile, Locality: 3, Seq: 42}.marshal())
	f.Add(uint32(3), []byte{})
	f.Add(uint32(2), []byte("tpmmux-vtpm-v1\x00\x00\x00\x00\x00\x02\x05"))
	f.Add(uint32(2), bytes.Repeat([]byte{0xff}, 64))
	f.Fuzz(func(t *testing.T, typ uint32, p []byte) {
		b, err := parseStateBlob(typ, p)
		if err != nil {
			return
		}
		if got := b.marshal(); !bytes.Equal(got, p) {
			t.Fatalf("accepted %x, re-encodes as %x", p, got)
		}
	})
}

func TestParseStateBlob(t *testing.T) {
	vol := stateBlob{Type: blobVolatile, Locality: 3, Seq: 42}.marshal()
	tests := []struct {
		name string
		typ  uint32
		p    []byte
		ok   bool
	}{
		{"permanent", blobPermanent, stateBlob{Type: blobPermanent}.marshal(), true},
		{"volatile", blobVolatile, vol, true},
		{"type mismatch", blobPermanent, vol, false},
		{"truncated", blobVolatile, vol[:len(vol)-1], false},
		{"trailing", blobVolatile, append(vol[:len(vol):len(vol)], 0), false},
		{"swtpm blob", blobVolatile, append([]byte{0, 0, 0, 1}, bytes.Repeat([]byte{7}, 100)...), false},
		{"bad locality", blobVolatile, stateBlob{Type: blobVolatile, Locality: 9}.marshal(), false},
		{"savestate", blobSavestate, append(append([]byte(nil), blobMagic...), 0, 0, 0, 3), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseStateBlob(tc.typ, tc.p)
			if (err == nil) != tc.ok {
				t.Fatalf("parseStateBlob: %v, want ok %v", err, tc.ok)
			}
		})
	}
}
