package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net"
)

// Segment is a run of the evidence bytes of one EvidenceResponse frame.
// A shared segment (Shared set) is bytes many frames carry, such as the
// public log segment every requester of one quote gets: EvidenceFrame
// neither copies nor checksums it, it uses CRC, the segment's CRC-32C
// (Castagnoli), which the owner of the bytes computed once. The bytes of a
// shared segment must not change while a frame that holds them is sent.
type Segment struct {
	Bytes  []byte
	Shared bool
	CRC    uint32 // CRC32C(Bytes), when Shared
}

// minShared is the least size of a shared segment that EvidenceFrame sends
// as it is: a smaller one is copied into the frame's own bytes, which costs
// less than the extra write it would take on a stream that has no vectored
// write (or a handoff between goroutines on net.Pipe).
const minShared = 4 << 10

// CRC32C is the CRC-32C (Castagnoli) of b, the checksum frames carry: the
// value a shared Segment states.
func CRC32C(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// EvidenceFrame returns the frame of resp with the evidence ev (resp's own
// Evidence is ignored), byte for byte what Encode(TypeEvidenceResponse, …)
// gives for resp with Evidence the concatenation of ev, as buffers to send
// with one vectored write (net.Buffers): the shared segments are referenced,
// not copied, and their checksums are combined into the frame's, so a frame
// costs the bridge its small per-request bytes however large the shared
// log is.
func EvidenceFrame(resp *EvidenceResponse, ev []Segment) (net.Buffers, error) {
	r := *resp
	r.ID, r.Evidence = 0, []byte{}
	enc, err := encMode.Marshal(&r)
	if err != nil {
		return nil, fmt.Errorf("encode %s: %w", TypeEvidenceResponse, err)
	}
	// The canonical encoding starts with the map's head, then key 1 (the
	// ID, here 0) and key 2 (the evidence, here empty): the rest follows.
	if len(enc) < 5 || enc[1] != 0x01 || enc[2] != 0x00 || enc[3] != 0x02 || enc[4] != 0x40 {
		return nil, errors.New("encode evidence response: unexpected field order")
	}
	rest := enc[5:]
	n, small := 0, 0
	for _, s := range ev {
		n += len(s.Bytes)
		if !s.Shared || len(s.Bytes) < minShared {
			small += len(s.Bytes)
		}
	}
	head := make([]byte, 0, 32)
	head = append(head, enc[0], 0x01)
	head = appendHead(head, 0, resp.ID)
	head = append(head, 0x02)
	head = appendHead(head, 2, uint64(n))
	size := len(head) + n + len(rest)
	if size > MaxPayload {
		return nil, fmt.Errorf("encode %s frame: %d bytes: %w", TypeEvidenceResponse, size, ErrTooLarge)
	}
	h := frameHeader(TypeEvidenceResponse, size)
	cur := make([]byte, 0, HeaderSize+len(head)+small+len(rest)+TrailerLen)
	cur = append(cur, h[:]...)
	cur = append(cur, head...)
	crc := crc32.Update(0, castagnoli, head)
	var out net.Buffers
	for _, s := range ev {
		if !s.Shared {
			cur = append(cur, s.Bytes...)
			crc = crc32.Update(crc, castagnoli, s.Bytes)
			continue
		}
		if len(s.Bytes) < minShared {
			// Cheaper copied than written on its own.
			cur = append(cur, s.Bytes...)
			crc = crc32Combine(crc, s.CRC, len(s.Bytes))
			continue
		}
		// The small buffer so far, then the shared bytes as they are; the
		// next small bytes go on in the same backing array.
		out = append(out, cur, s.Bytes)
		cur = cur[len(cur):]
		crc = crc32Combine(crc, s.CRC, len(s.Bytes))
	}
	cur = append(cur, rest...)
	crc = crc32.Update(crc, castagnoli, rest)
	cur = binary.BigEndian.AppendUint32(cur, crc)
	return append(out, cur), nil
}

// appendHead appends a CBOR head of major type major and argument v in its
// shortest form, as the canonical encoder writes it.
func appendHead(b []byte, major byte, v uint64) []byte {
	mt := major << 5
	switch {
	case v < 24:
		return append(b, mt|byte(v))
	case v <= 0xff:
		return append(b, mt|24, byte(v))
	case v <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, mt|25), uint16(v))
	case v <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, mt|26), uint32(v))
	}
	return binary.BigEndian.AppendUint64(append(b, mt|27), v)
}

// crc32Combine returns the CRC-32C of A||B from crcA = CRC32C(A) and
// crcB = CRC32C(B), with n = len(B): crcA is multiplied by x^(8n) modulo
// the polynomial (zlib's crc32_combine), in O(log n) steps instead of a
// pass over B.
func crc32Combine(crcA, crcB uint32, n int) uint32 {
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

// xPow8n returns x^(8n) modulo the polynomial, by squaring x^8.
func xPow8n(n uint64) uint32 {
	p := uint32(1) << 31  // x^0
	sq := uint32(1) << 23 // x^8
	for n > 0 {
		if n&1 != 0 {
			p = multModP(sq, p)
		}
		sq = multModP(sq, sq)
		n >>= 1
	}
	return p
}

// SendFrame writes one frame given as buffers (EvidenceFrame) with one
// vectored write where the stream supports it (net.Buffers).
func (c *Conn) SendFrame(t Type, frame net.Buffers) error {
	if _, err := frame.WriteTo(c.w); err != nil {
		return fmt.Errorf("send %s: %w", t, err)
	}
	return nil
}
