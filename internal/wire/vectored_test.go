package wire

import (
	"bytes"
	"crypto/rand"
	"hash/crc32"
	mrand "math/rand/v2"
	"testing"
)

// TestCRC32Combine: the combined checksum of two runs is the checksum of
// their concatenation, for lengths around every power of two.
func TestCRC32Combine(t *testing.T) {
	buf := make([]byte, 70000)
	rand.Read(buf)
	lens := []int{0, 1, 2, 3, 7, 8, 9, 31, 64, 100, 255, 256, 1000, 4096, 65535, 65536, 69999}
	for _, a := range lens {
		for _, b := range lens {
			if a+b > len(buf) {
				continue
			}
			A, B := buf[:a], buf[a:a+b]
			got := crc32Combine(CRC32C(A), CRC32C(B), len(B))
			if want := crc32.Checksum(buf[:a+b], castagnoli); got != want {
				t.Fatalf("combine(%d, %d) = %08x, want %08x", a, b, got, want)
			}
		}
	}
}

// TestEvidenceFrame: a frame assembled from segments, shared ones by
// reference with their own checksums, is byte for byte the frame Encode
// writes for the same response, and the reader takes it.
func TestEvidenceFrame(t *testing.T) {
	pem := []byte("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n")
	resps := []EvidenceResponse{
		{ID: 1},
		{ID: 23, UUID: [16]byte{1}, Instance: [16]byte{2}, Key: [32]byte{3}, AKPEM: pem},
		{ID: 24, Part: 3, More: true, Total: 1 << 21},
		{ID: 1 << 40, AKPEM: pem, More: true, Total: 5},
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i, resp := range resps {
		for _, n := range []int{0, 1, 23, 24, 255, 256, 70000, 300000} {
			ev := make([]byte, n)
			rand.Read(ev)
			// Cut ev into up to 5 segments, some shared.
			var segs []Segment
			for off := 0; off < n || len(segs) == 0; {
				k := min(n-off, rng.IntN(n+1))
				if len(segs) == 4 {
					k = n - off
				}
				s := Segment{Bytes: ev[off : off+k], Shared: rng.IntN(2) == 0}
				if s.Shared {
					s.CRC = CRC32C(s.Bytes)
				}
				segs = append(segs, s)
				off += k
				if k == 0 && off < n {
					continue
				}
			}
			bufs, err := EvidenceFrame(&resp, segs)
			if err != nil {
				t.Fatal(err)
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
				t.Fatalf("response %d, %d bytes in %d segments: frame differs from Encode's", i, n, len(segs))
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

// TestEvidenceFrameWrongCRC: a shared segment whose stated checksum is
// wrong makes a frame the reader refuses (the checksum is not trusted
// blindly into a frame that then decodes).
func TestEvidenceFrameWrongCRC(t *testing.T) {
	ev := bytes.Repeat([]byte{7}, 1000)
	bufs, err := EvidenceFrame(&EvidenceResponse{ID: 9}, []Segment{{Bytes: ev, Shared: true, CRC: CRC32C(ev) ^ 1}})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	bufs.WriteTo(&b)
	if _, err := NewReader(&b, false).Next(); err == nil {
		t.Fatal("a frame with a wrong shared checksum was read")
	}
}

// BenchmarkEvidenceFrame is the bridge's cost to frame one response of 71
// KiB of evidence: Encode copies and checksums the evidence, EvidenceFrame
// only the per-request bytes.
func BenchmarkEvidenceFrame(b *testing.B) {
	body := make([]byte, 71<<10)
	rand.Read(body)
	crc := CRC32C(body)
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
		for b.Loop() {
			if _, err := EvidenceFrame(&EvidenceResponse{ID: 5, AKPEM: pem}, []Segment{{Bytes: pre}, {Bytes: body, Shared: true, CRC: crc}, {Bytes: post}}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
