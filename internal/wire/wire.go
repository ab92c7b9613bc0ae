// Package wire is the framed, versioned protocol between the guest agent
// and the bridge. It runs unchanged over AF_VSOCK, virtio-serial and unix
// sockets. Every frame carries a magic, a version, a type, a length and two
// CRC-32C checksums (header and payload), so a reader on a byte stream with
// no message boundaries and no EOF (virtio-serial) can resynchronize after
// garbage or a torn frame, and a reader on a reliable stream can refuse
// garbage at once. Payloads are CBOR maps with small integer keys, decoded
// with hard limits.
//
//	offset size
//	0      2    magic "TM"
//	2      1    version (1)
//	3      1    message type
//	4      4    payload length L, big-endian, at most MaxPayload
//	8      4    CRC-32C (Castagnoli) of bytes 0..7
//	12     L    payload (CBOR)
//	12+L   4    CRC-32C of the payload
package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Protocol constants.
const (
	Version    = 1
	HeaderSize = 12
	TrailerLen = 4
	// MaxPayload bounds one frame's payload: a measurement batch of
	// MaxEntries entries, or one evidence response.
	MaxPayload = 8 << 20
	// MaxEntries bounds the measurement entries in one frame.
	MaxEntries = 1024
)

var magic = [2]byte{'T', 'M'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Type is a message type.
type Type uint8

// Message types.
const (
	TypeHello            Type = 1
	TypeWelcome          Type = 2
	TypeMeasurements     Type = 3
	TypeAck              Type = 4
	TypeError            Type = 5
	TypeEvidenceRequest  Type = 6
	TypeEvidenceResponse Type = 7
	TypeBind             Type = 8
	TypePing             Type = 9
	TypePong             Type = 10
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeWelcome:
		return "welcome"
	case TypeMeasurements:
		return "measurements"
	case TypeAck:
		return "ack"
	case TypeError:
		return "error"
	case TypeEvidenceRequest:
		return "evidence-request"
	case TypeEvidenceResponse:
		return "evidence-response"
	case TypeBind:
		return "bind"
	case TypePing:
		return "ping"
	case TypePong:
		return "pong"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

func (t Type) known() bool { return t >= TypeHello && t <= TypePong }

// Errors a Reader reports. A FrameError on a reliable stream means the peer
// is not speaking the protocol; on a resynchronizing reader it is counted
// and skipped.
var (
	ErrBadMagic   = errors.New("bad frame magic")
	ErrBadVersion = errors.New("unsupported protocol version")
	ErrBadType    = errors.New("unknown message type")
	ErrTooLarge   = errors.New("frame larger than the limit")
	ErrHeaderCRC  = errors.New("frame header checksum mismatch")
	ErrPayloadCRC = errors.New("frame payload checksum mismatch")
)

// Frame is one decoded frame.
type Frame struct {
	Type    Type
	Payload []byte
}

// AppendFrame appends the frame for (t, payload) to b.
func AppendFrame(b []byte, t Type, payload []byte) ([]byte, error) {
	if len(payload) > MaxPayload {
		return b, fmt.Errorf("encode %s frame: %d bytes: %w", t, len(payload), ErrTooLarge)
	}
	h := frameHeader(t, len(payload))
	b = append(b, h[:]...)
	b = append(b, payload...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(payload, castagnoli)), nil
}

// frameHeader is the header of a frame of type t with n payload bytes.
func frameHeader(t Type, n int) [HeaderSize]byte {
	var h [HeaderSize]byte
	h[0], h[1], h[2], h[3] = magic[0], magic[1], Version, byte(t)
	binary.BigEndian.PutUint32(h[4:8], uint32(n))
	binary.BigEndian.PutUint32(h[8:12], crc32.Checksum(h[:8], castagnoli))
	return h
}

// Reader reads frames from a byte stream.
type Reader struct {
	br       *bufio.Reader
	resync   bool
	maxLen   int
	skipped  uint64
	badFrame uint64
}

// NewReader reads frames from r. With resync, garbage and torn frames are
// skipped (and counted) until the next valid frame, as a virtio-serial
// stream needs; without it, the first bad frame is an error.
func NewReader(r io.Reader, resync bool) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 64<<10), resync: resync, maxLen: MaxPayload}
}

// SetMaxPayload lowers the payload limit for this reader (e.g. for a
// bridge that serves small frames only).
func (r *Reader) SetMaxPayload(n int) {
	if n > 0 && n < MaxPayload {
		r.maxLen = n
	}
}

// Skipped returns how many garbage bytes a resynchronizing reader dropped,
// and how many frames it dropped for a bad checksum.
func (r *Reader) Skipped() (bytes, frames uint64) { return r.skipped, r.badFrame }

// Next returns the next frame. The payload is freshly allocated. io.EOF
// means the stream ended on a frame boundary; io.ErrUnexpectedEOF in the
// middle of a frame.
func (r *Reader) Next() (Frame, error) {
	for {
		f, err := r.next()
		if err == nil {
			return f, nil
		}
		var torn *tornError
		if r.resync && errors.As(err, &torn) {
			r.br.Discard(torn.skip)
			r.skipped += uint64(torn.skip)
			r.badFrame++
			continue
		}
		if !r.resync || !isFrameError(err) {
			return Frame{}, err
		}
		// Drop one byte and look for the next magic.
		if _, derr := r.br.Discard(1); derr != nil {
			return Frame{}, derr
		}
		r.skipped++
		if errors.Is(err, ErrPayloadCRC) {
			r.badFrame++
		}
	}
}

func isFrameError(err error) bool {
	for _, e := range []error{ErrBadMagic, ErrBadVersion, ErrBadType, ErrTooLarge, ErrHeaderCRC, ErrPayloadCRC} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func (r *Reader) next() (Frame, error) {
	if r.resync {
		// Skip to the next byte that could start a magic.
		for {
			c, err := r.br.Peek(1)
			if err != nil {
				return Frame{}, err
			}
			if c[0] == magic[0] {
				break
			}
			r.br.Discard(1)
			r.skipped++
		}
	}
	h, err := r.br.Peek(HeaderSize)
	if err != nil {
		if errors.Is(err, io.EOF) && len(h) > 0 {
			if r.resync && (h[0] != magic[0] || (len(h) > 1 && h[1] != magic[1])) {
				return Frame{}, fmt.Errorf("%w: %x", ErrBadMagic, h[:min(2, len(h))])
			}
			return Frame{}, io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if h[0] != magic[0] || h[1] != magic[1] {
		return Frame{}, fmt.Errorf("%w: %x", ErrBadMagic, h[:2])
	}
	if binary.BigEndian.Uint32(h[8:12]) != crc32.Checksum(h[:8], castagnoli) {
		return Frame{}, ErrHeaderCRC
	}
	if h[2] != Version {
		return Frame{}, fmt.Errorf("%w %d (this side speaks %d)", ErrBadVersion, h[2], Version)
	}
	t := Type(h[3])
	if !t.known() {
		return Frame{}, fmt.Errorf("%w %d", ErrBadType, h[3])
	}
	n := int(binary.BigEndian.Uint32(h[4:8]))
	if n > r.maxLen {
		return Frame{}, fmt.Errorf("%s frame of %d bytes (limit %d): %w", t, n, r.maxLen, ErrTooLarge)
	}
	// The header is good; only now consume it. A payload checksum failure
	// leaves the reader after the header; resync then rescans from there.
	total := HeaderSize + n + TrailerLen
	buf := make([]byte, total)
	if r.resync && total <= r.br.Size() {
		// Wait for the frame's bytes, but watch them: a valid frame header
		// inside this frame's body means this frame is torn (its writer
		// died mid-frame and a new one started). Without this a torn frame
		// would wait forever for bytes that only the next frame supplies,
		// since virtio-serial has no EOF.
		for {
			avail := r.br.Buffered()
			if avail >= total {
				break
			}
			p, _ := r.br.Peek(avail)
			if k := findHeader(p, 1); k > 0 {
				return Frame{}, &tornError{skip: k}
			}
			if _, err := r.br.Peek(avail + 1); err != nil {
				if errors.Is(err, io.EOF) {
					return Frame{}, io.ErrUnexpectedEOF
				}
				return Frame{}, err
			}
		}
		p, _ := r.br.Peek(total)
		if k := findHeader(p[:total-TrailerLen], 1); k > 0 && binary.BigEndian.Uint32(p[total-4:]) != crc32.Checksum(p[HeaderSize:total-4], castagnoli) {
			return Frame{}, &tornError{skip: k}
		}
		if binary.BigEndian.Uint32(p[total-4:]) != crc32.Checksum(p[HeaderSize:total-4], castagnoli) {
			return Frame{}, ErrPayloadCRC
		}
		copy(buf, p)
		r.br.Discard(total)
		return Frame{Type: t, Payload: buf[HeaderSize : total-4]}, nil
	}
	if _, err := io.ReadFull(r.br, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	if binary.BigEndian.Uint32(buf[total-4:]) != crc32.Checksum(buf[HeaderSize:total-4], castagnoli) {
		return Frame{}, ErrPayloadCRC
	}
	return Frame{Type: t, Payload: buf[HeaderSize : total-4]}, nil
}

// tornError reports a frame cut short by a new frame starting skip bytes
// after its start.
type tornError struct{ skip int }

func (e *tornError) Error() string {
	return fmt.Sprintf("torn frame: a new frame starts %d bytes in", e.skip)
}

// findHeader returns the offset, at or after from, of the first valid frame
// header (magic, version, known type and header checksum) wholly inside p,
// or -1.
func findHeader(p []byte, from int) int {
	for i := from; i+HeaderSize <= len(p); i++ {
		if p[i] != magic[0] || p[i+1] != magic[1] || p[i+2] != Version || !Type(p[i+3]).known() {
			continue
		}
		if binary.BigEndian.Uint32(p[i+8:i+12]) == crc32.Checksum(p[i:i+8], castagnoli) {
			return i
		}
	}
	return -1
}
