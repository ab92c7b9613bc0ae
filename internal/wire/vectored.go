package wire

import (
	"encoding/binary"
	"fmt"
	"net"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/crc32c"
)

// minShared is the least size of a shared run of bytes that EvidenceFrame
// sends as it is: a smaller one is copied into the frame's own bytes, which
// costs less than the extra write it would take on a stream that has no
// vectored write (or a handoff between goroutines on net.Pipe).
const minShared = 4 << 10

// EvidenceFrame returns the frame of resp whose evidence (resp's own
// Evidence is ignored) is the runs of head, then shared.Bytes, then the
// runs of tail: byte for byte what Encode(TypeEvidenceResponse, …) gives
// for resp with that evidence, as buffers to send with one vectored write
// (net.Buffers). The shared bytes (the log segment every requester of one
// quote gets) are referenced, not copied, and their checksum, computed
// once, is combined into the frame's, so a frame costs the sender its own
// small bytes however large the shared ones are. shared.Bytes must not
// change while the frame is sent. The frame's own bytes are written into
// *scratch when it is not nil (its array is reused, and kept there when
// it grows): the caller must not change or reuse it until the frame is
// sent.
func EvidenceFrame(scratch *[]byte, resp *EvidenceResponse, head [][]byte, shared crc32c.Shared, tail [][]byte) (net.Buffers, error) {
	n, small := len(shared.Bytes), 0
	for _, r := range head {
		small += len(r)
	}
	for _, r := range tail {
		small += len(r)
	}
	n += small
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
	if resp.Early {
		fields++
	}
	var pre [32]byte
	p := canon.AppendHead(pre[:0], 5, uint64(fields))
	p = append(p, 0x01)
	p = canon.AppendHead(p, 0, resp.ID)
	p = append(p, 0x02)
	p = canon.AppendHead(p, 2, uint64(n))
	restLen := 96 + len(resp.AKPEM) // at most
	if len(p)+n > MaxPayload {
		return nil, fmt.Errorf("encode %s frame: %d bytes: %w", TypeEvidenceResponse, len(p)+n, ErrTooLarge)
	}
	need := HeaderSize + len(p) + small + restLen + TrailerLen
	var cur []byte
	if scratch != nil && cap(*scratch) >= need {
		cur = (*scratch)[:0]
	} else {
		cur = make([]byte, 0, need)
		if scratch != nil {
			*scratch = cur
		}
	}
	cur = append(cur, make([]byte, HeaderSize)...) // the header, once the size is known
	start := len(cur)
	cur = append(cur, p...)
	for _, r := range head {
		cur = append(cur, r...)
	}
	var out net.Buffers
	crc := crc32c.Update(0, cur[start:])
	first := cur
	if len(shared.Bytes) >= minShared {
		// The frame's bytes so far, then the shared bytes as they are; the
		// rest goes on in the same backing array.
		out = append(out, cur, shared.Bytes)
		cur = cur[len(cur):]
	} else {
		cur = append(cur, shared.Bytes...)
	}
	crc = shared.Append(crc)
	mark := len(cur)
	for _, r := range tail {
		cur = append(cur, r...)
	}
	restStart := len(cur)
	cur = appendResponseRest(cur, resp)
	crc = crc32c.Update(crc, cur[mark:])
	payload := len(p) + n + len(cur) - restStart
	if payload > MaxPayload {
		return nil, fmt.Errorf("encode %s frame: %d bytes: %w", TypeEvidenceResponse, payload, ErrTooLarge)
	}
	h := frameHeader(TypeEvidenceResponse, payload)
	copy(first[:HeaderSize], h[:])
	cur = binary.BigEndian.AppendUint32(cur, crc)
	return append(out, cur), nil
}

// appendResponseRest appends the fields of resp after its evidence (keys
// 3 to 10) as the canonical encoder writes them (TestEvidenceFrame holds
// it to Encode's bytes): written out here because a bridge answering a
// thousand verifiers a quote spent more on encoding this small struct by
// reflection than on the rest of the frame.
func appendResponseRest(b []byte, resp *EvidenceResponse) []byte {
	b = append(b, 0x03)
	b = canon.AppendHead(b, 2, uint64(len(resp.UUID)))
	b = append(b, resp.UUID[:]...)
	b = append(b, 0x04)
	b = canon.AppendHead(b, 2, uint64(len(resp.Instance)))
	b = append(b, resp.Instance[:]...)
	b = append(b, 0x05)
	b = canon.AppendHead(b, 2, uint64(len(resp.Key)))
	b = append(b, resp.Key[:]...)
	b = append(b, 0x06)
	if resp.AKPEM == nil {
		b = append(b, 0xf6)
	} else {
		b = canon.AppendHead(b, 2, uint64(len(resp.AKPEM)))
		b = append(b, resp.AKPEM...)
	}
	if resp.Part != 0 {
		b = append(b, 0x07)
		b = canon.AppendHead(b, 0, uint64(resp.Part))
	}
	if resp.More {
		b = append(b, 0x08, 0xf5)
	}
	if resp.Total != 0 {
		b = append(b, 0x09)
		b = canon.AppendHead(b, 0, resp.Total)
	}
	if resp.Early {
		b = append(b, 0x0a, 0xf5)
	}
	return b
}

// SendFrame writes one frame given as buffers (EvidenceFrame) with one
// vectored write where the stream supports it (net.Buffers).
func (c *Conn) SendFrame(t Type, frame net.Buffers) error {
	if _, err := frame.WriteTo(c.w); err != nil {
		return fmt.Errorf("send %s: %w", t, err)
	}
	return nil
}
