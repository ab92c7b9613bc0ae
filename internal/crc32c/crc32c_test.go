package crc32c

import (
	"crypto/rand"
	"hash/crc32"
	"testing"
)

// TestCombine: the checksum of A||B from A's and B's (Combine, and a
// Shared B with its factor made once or not at all) is the checksum of
// the concatenation, for lengths around powers of two.
func TestCombine(t *testing.T) {
	buf := make([]byte, 70000)
	rand.Read(buf)
	lens := []int{0, 1, 2, 3, 7, 8, 9, 31, 64, 100, 255, 256, 1000, 4096, 65535, 65536, 69999}
	for _, a := range lens {
		for _, b := range lens {
			if a+b > len(buf) {
				continue
			}
			A, B := buf[:a], buf[a:a+b]
			want := crc32.Checksum(buf[:a+b], crc32.MakeTable(crc32.Castagnoli))
			if got := Combine(Checksum(A), Checksum(B), len(B)); got != want {
				t.Fatalf("Combine(%d, %d) = %08x, want %08x", a, b, got, want)
			}
			if got := NewShared(B).Append(Checksum(A)); got != want {
				t.Fatalf("NewShared(%d).Append(%d) = %08x, want %08x", b, a, got, want)
			}
			if got := (Shared{Bytes: B, CRC: Checksum(B)}).Append(Checksum(A)); got != want {
				t.Fatalf("Shared literal (%d).Append(%d) = %08x, want %08x", b, a, got, want)
			}
			if got := Update(Checksum(A), B); got != want {
				t.Fatalf("Update(%d, %d) = %08x, want %08x", a, b, got, want)
			}
		}
	}
}

// BenchmarkAppend is the cost of moving a frame's checksum past a shared
// 71 KiB segment whose factor was computed once, and without it.
func BenchmarkAppend(b *testing.B) {
	s := NewShared(make([]byte, 71<<10))
	b.Run("shared", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			s.Append(uint32(i))
		}
	})
	b.Run("combine", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			Combine(uint32(i), s.CRC, len(s.Bytes))
		}
	})
}
