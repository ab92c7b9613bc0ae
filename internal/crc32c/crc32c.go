// Package crc32c is the CRC-32C (Castagnoli) checksum the guest protocol's
// frames carry, with what a sender needs to checksum bytes that many frames
// share only once: the checksum of A||B from those of A and B (Combine),
// and a Shared run of bytes that carries its checksum and the factor that
// shifts a checksum past it, both computed once.
package crc32c

import "hash/crc32"

var table = crc32.MakeTable(crc32.Castagnoli)

// Checksum returns the CRC-32C of b.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, table) }

// Update returns the CRC-32C of A||b given crc, the CRC-32C of A.
func Update(crc uint32, b []byte) uint32 { return crc32.Update(crc, table, b) }

// Shared is a run of bytes many frames carry, with its checksum and the
// factor that moves a checksum past it. Bytes must not change.
type Shared struct {
	Bytes []byte
	CRC   uint32 // Checksum(Bytes)
	shift uint32 // x^(8·len(Bytes)) modulo the polynomial
}

// NewShared checksums b once for every frame that will carry it.
func NewShared(b []byte) Shared {
	return Shared{Bytes: b, CRC: Checksum(b), shift: xPow8n(uint64(len(b)))}
}

// Append returns the CRC-32C of A||s.Bytes given crc, the CRC-32C of A,
// without a pass over the bytes. A Shared made as a literal, without
// NewShared, has its factor computed here.
func (s Shared) Append(crc uint32) uint32 {
	if len(s.Bytes) == 0 {
		return crc
	}
	shift := s.shift
	if shift == 0 {
		shift = xPow8n(uint64(len(s.Bytes)))
	}
	return multModP(shift, crc) ^ s.CRC
}

// Combine returns the CRC-32C of A||B from crcA, crcB and n = len(B)
// (zlib's crc32_combine): crcA multiplied by x^(8n) modulo the polynomial,
// in O(log n) steps instead of a pass over B.
func Combine(crcA, crcB uint32, n int) uint32 {
	if n <= 0 {
		return crcA
	}
	return multModP(xPow8n(uint64(n)), crcA) ^ crcB
}

// castagnoliRev is the Castagnoli polynomial, bit-reversed as crc32 uses it.
const castagnoliRev = 0x82f63b78

// multModP multiplies a and b modulo the polynomial (reflected: bit 31 is
// x^0).
func multModP(a, b uint32) uint32 {
	m := uint32(1) << 31
	var p uint32
	for {
		if a&m != 0 {
			p ^= b
			if a&(m-1) == 0 {
				return p
			}
		}
		m >>= 1
		if b&1 != 0 {
			b = b>>1 ^ castagnoliRev
		} else {
			b >>= 1
		}
	}
}

// x2n[k] is x^(8·2^k) modulo the polynomial (read-only after init).
var x2n = func() (t [64]uint32) {
	t[0] = 1 << 23 // x^8
	for k := 1; k < len(t); k++ {
		t[k] = multModP(t[k-1], t[k-1])
	}
	return t
}()

// xPow8n returns x^(8n) modulo the polynomial: the product of the powers
// of two that n is the sum of.
func xPow8n(n uint64) uint32 {
	p := uint32(1) << 31 // x^0
	for k := 0; n > 0; k, n = k+1, n>>1 {
		if n&1 != 0 {
			p = multModP(x2n[k], p)
		}
	}
	return p
}
