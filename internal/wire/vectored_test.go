package wire

import (
	"bytes"
	"crypto/rand"
	mrand "math/rand/v2"
	"reflect"
	"testing"

	"github.com/tpmmux/tpmmux/internal/crc32c"
)

// TestEvidenceFrame: a frame assembled around shared bytes (referenced,
// with their own checksum, or copied when small) is byte for byte the
// frame Encode writes for the same response, and the reader takes it.
func TestEvidenceFrame(t *testing.T) {
	// appendResponseRest writes the fields out by hand: a new field must
	// be added there (and here).
	if n := reflect.TypeOf(EvidenceResponse{}).NumField(); n != 10 {
		t.Fatalf("EvidenceResponse has %d fields; EvidenceFrame writes 10", n)
	}
	pem := []byte("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n")
	resps := []EvidenceResponse{
		{ID: 1},
		{ID: 23, UUID: [16]byte{1}, Instance: [16]byte{2}, Key: [32]byte{3}, AKPEM: pem},
		{ID: 24, Part: 3, More: true, Total: 1 << 21},
		{ID: 1 << 40, AKPEM: pem, More: true, Total: 5},
		{ID: 7, AKPEM: []byte{}, Part: 1},
		{ID: 8, UUID: [16]byte{0xff, 1}, Key: [32]byte{31: 9}, AKPEM: pem, Part: 1 << 20, More: true, Total: 1 << 33},
		{ID: 9, UUID: [16]byte{4}, AKPEM: pem, More: true, Early: true},
		{ID: 10, Part: 2, More: true, Early: true},
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	var reuse []byte
	for i, resp := range resps {
		for _, n := range []int{0, 1, 23, 24, 255, 256, 4095, 4096, 5000, 70000, 300000} {
			ev := make([]byte, n)
			rand.Read(ev)
			a := rng.IntN(n + 1)
			b := a + rng.IntN(n-a+1)
			for k, literal := range []bool{false, true} {
				var scratch *[]byte
				if k == 1 {
					scratch = &reuse
				}
				shared := crc32c.NewShared(ev[a:b])
				if literal {
					shared = crc32c.Shared{Bytes: ev[a:b], CRC: crc32c.Checksum(ev[a:b])}
				}
				bufs, err := EvidenceFrame(scratch, &resp, [][]byte{ev[:a/2], ev[a/2 : a]}, shared, [][]byte{ev[b:]})
				if err != nil {
					t.Fatal(err)
				}
				if wantBufs := 1 + 2*btoi(b-a >= minShared); len(bufs) != wantBufs {
					t.Fatalf("%d buffers", len(bufs))
				}
				var got bytes.Buffer
				for _, b := range bufs {
					got.Write(b)
				}
				r := resp
				r.Evidence = ev
				want, err := Encode(TypeEvidenceResponse, &r)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got.Bytes(), want) {
					t.Fatalf("response %d, %d bytes shared %d..%d: frame differs from Encode's", i, n, a, b)
				}
				f, err := NewReader(bytes.NewReader(got.Bytes()), false).Next()
				if err != nil {
					t.Fatal(err)
				}
				var back EvidenceResponse
				if err := Decode(f, &back); err != nil || back.ID != resp.ID || !bytes.Equal(back.Evidence, ev) {
					t.Fatalf("response %d: decoded back %v, ID %d", i, err, back.ID)
				}
			}
		}
	}
}

// TestEvidenceFrameWrongCRC: shared bytes whose stated checksum is wrong
// make a frame the reader refuses, whether they are referenced or copied.
func TestEvidenceFrameWrongCRC(t *testing.T) {
	for _, n := range []int{1000, 10000} {
		ev := bytes.Repeat([]byte{7}, n)
		bufs, err := EvidenceFrame(nil, &EvidenceResponse{ID: 9}, nil, crc32c.Shared{Bytes: ev, CRC: crc32c.Checksum(ev) ^ 1}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		bufs.WriteTo(&b)
		if _, err := NewReader(&b, false).Next(); err == nil {
			t.Fatalf("%d bytes: a frame with a wrong shared checksum was read", n)
		}
	}
}

// BenchmarkEvidenceFrame is the bridge's cost to frame one response of 71
// KiB of evidence: Encode copies and checksums the evidence, EvidenceFrame
// only the per-request bytes.
func BenchmarkEvidenceFrame(b *testing.B) {
	body := make([]byte, 71<<10)
	rand.Read(body)
	shared := crc32c.NewShared(body)
	pre, post := make([]byte, 700), make([]byte, 900)
	pem := make([]byte, 180)
	b.Run("encode", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			ev := append(append(append(make([]byte, 0, len(pre)+len(body)+len(post)), pre...), body...), post...)
			if _, err := Encode(TypeEvidenceResponse, &EvidenceResponse{ID: 5, Evidence: ev, AKPEM: pem}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("vectored", func(b *testing.B) {
		b.ReportAllocs()
		var scratch []byte
		for b.Loop() {
			if _, err := EvidenceFrame(&scratch, &EvidenceResponse{ID: 5, AKPEM: pem}, [][]byte{pre}, shared, [][]byte{post}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
