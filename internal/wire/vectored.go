package wire

import (
	"encoding/binary"
	"fmt"
	"net"

	"github.com/tpmmux/tpmmux/internal/crc32c"
)

// minShared is the least size of a shared run of bytes that EvidenceFrame
// sends as it is: a smaller one is copied into the frame's own bytes, which
// costs less than the extra write it would take on a stream that has no
// vectored write (or a handoff between goroutines on net.Pipe).
const minShared = 4 << 10

// EvidenceFrame returns the frame of resp whose evidence (resp's own
// Evidence is ignored) is head, then shared.Bytes, then tail: byte for
// byte what Encode(TypeEvidenceResponse, …) gives for resp with that
// evidence, as buffers to send with one vectored write (net.Buffers).
// The shared bytes (the log segment every requester of one quote gets) are
// referenced, not copied, and their checksum, computed once, is combined
// into the frame's, so a frame costs the sender its own small bytes
// however large the shared ones are. shared.Bytes must not change while
// the frame is sent.
func EvidenceFrame(resp *EvidenceResponse, head []byte, shared crc32c.Shared, tail []byte) (net.Buffers, error) {
	rest := make([]byte, 0, 96+len(resp.AKPEM))
	rest = appendResponseRest(rest, resp)
	n := len(head) + len(shared.Bytes) + len(tail)
	small := len(head) + len(tail)
	if len(shared.Bytes) < minShared {
		small += len(shared.Bytes)
	}
	fields := 6
	if resp.Part != 0 {
		fields++
	}
	if resp.More {
		fields++
	}
	if resp.Total != 0 {
		fields++
	}
	pre := make([]byte, 0, 32)
	pre = appendHead(pre, 5, uint64(fields))
	pre = append(pre, 0x01)
	pre = appendHead(pre, 0, resp.ID)
	pre = append(pre, 0x02)
	pre = appendHead(pre, 2, uint64(n))
	size := len(pre) + n + len(rest)
	if size > MaxPayload {
		return nil, fmt.Errorf("encode %s frame: %d bytes: %w", TypeEvidenceResponse, size, ErrTooLarge)
	}
	h := frameHeader(TypeEvidenceResponse, size)
	cur := make([]byte, 0, HeaderSize+len(pre)+small+len(rest)+TrailerLen)
	cur = append(cur, h[:]...)
	cur = append(cur, pre...)
	cur = append(cur, head...)
	crc := crc32c.Update(crc32c.Update(0, pre), head)
	var out net.Buffers
	if len(shared.Bytes) >= minShared {
		// The frame's bytes so far, then the shared bytes as they are; the
		// rest goes on in the same backing array.
		out = append(out, cur, shared.Bytes)
		cur = cur[len(cur):]
	} else {
		cur = append(cur, shared.Bytes...)
	}
	crc = shared.Append(crc)
	cur = append(cur, tail...)
	cur = append(cur, rest...)
	crc = crc32c.Update(crc32c.Update(crc, tail), rest)
	cur = binary.BigEndian.AppendUint32(cur, crc)
	return append(out, cur), nil
}

// appendResponseRest appends the fields of resp after its evidence (keys
// 3 to 9) as the canonical encoder writes them (TestEvidenceFrame holds
// it to Encode's bytes): written out here because a bridge answering a
// thousand verifiers a quote spent more on encoding this small struct by
// reflection than on the rest of the frame.
func appendResponseRest(b []byte, resp *EvidenceResponse) []byte {
	b = append(b, 0x03)
	b = appendHead(b, 2, uint64(len(resp.UUID)))
	b = append(b, resp.UUID[:]...)
	b = append(b, 0x04)
	b = appendHead(b, 2, uint64(len(resp.Instance)))
	b = append(b, resp.Instance[:]...)
	b = append(b, 0x05)
	b = appendHead(b, 2, uint64(len(resp.Key)))
	b = append(b, resp.Key[:]...)
	b = append(b, 0x06)
	if resp.AKPEM == nil {
		b = append(b, 0xf6)
	} else {
		b = appendHead(b, 2, uint64(len(resp.AKPEM)))
		b = append(b, resp.AKPEM...)
	}
	if resp.Part != 0 {
		b = append(b, 0x07)
		b = appendHead(b, 0, uint64(resp.Part))
	}
	if resp.More {
		b = append(b, 0x08, 0xf5)
	}
	if resp.Total != 0 {
		b = append(b, 0x09)
		b = appendHead(b, 0, resp.Total)
	}
	return b
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

// SendFrame writes one frame given as buffers (EvidenceFrame) with one
// vectored write where the stream supports it (net.Buffers).
func (c *Conn) SendFrame(t Type, frame net.Buffers) error {
	if _, err := frame.WriteTo(c.w); err != nil {
		return fmt.Errorf("send %s: %w", t, err)
	}
	return nil
}
