package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/fxamacker/cbor/v2"

	"github.com/tpmmux/tpmmux/internal/wire"
)

// frameReader is a P3 verifier's receiving end: it reads the bridge's
// frames through a buffer it reuses, as wire.Reader does (bufio), and
// checks a frame that fits the buffer in place. The in-process verifiers
// stand for verifiers on machines of their own; what they spend per
// response (allocating, zeroing and decoding 72 KiB of evidence, 72 MB per
// quote at 1000 verifiers) is not the bridge's work, but on this machine
// it shares the bridge's two cores, and at 1000 verifiers it was most of
// the CPU of a quote round. Every frame is still read whole and checked as
// wire.Reader checks it (magic, version, header and payload CRC-32C), and
// the response's header fields (request ID, part) are decoded; the sampled
// responses are decoded in full and verified with verify.Verify.
type frameReader struct {
	br  *bufio.Reader
	buf []byte  // a frame larger than br's buffer
	ref [4]byte // magic and version, from a frame wire.AppendFrame wrote
}

// frameBuffer is the verifier's read buffer: P3's responses (72 KiB of
// full evidence at most) fit it, so each is checked where it was read.
const frameBuffer = 128 << 10

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func newFrameReader(r io.Reader) *frameReader {
	fr := &frameReader{br: bufio.NewReaderSize(r, frameBuffer)}
	ref, _ := wire.AppendFrame(nil, wire.TypePing, nil)
	copy(fr.ref[:3], ref[:3])
	return fr
}

// next reads one frame; its payload is valid until the next call.
func (fr *frameReader) next() (wire.Frame, error) {
	h, err := fr.br.Peek(wire.HeaderSize)
	if err != nil {
		if errors.Is(err, io.EOF) && len(h) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return wire.Frame{}, err
	}
	if h[0] != fr.ref[0] || h[1] != fr.ref[1] || h[2] != fr.ref[2] {
		return wire.Frame{}, fmt.Errorf("frame header %x: not a version %d frame", h[:3], fr.ref[2])
	}
	if binary.BigEndian.Uint32(h[8:12]) != crc32.Checksum(h[:8], castagnoli) {
		return wire.Frame{}, errors.New("frame header checksum mismatch")
	}
	n := int(binary.BigEndian.Uint32(h[4:8]))
	if n > wire.MaxPayload {
		return wire.Frame{}, fmt.Errorf("frame of %d bytes, limit %d", n, wire.MaxPayload)
	}
	t := wire.Type(h[3])
	total := wire.HeaderSize + n + wire.TrailerLen
	var b []byte
	if total <= fr.br.Size() {
		// Checked in the read buffer; discarded at once, its bytes stay
		// until the next read refills the buffer.
		if b, err = fr.br.Peek(total); err != nil {
			return wire.Frame{}, fmt.Errorf("frame of %d bytes: %w", n, unexpected(err))
		}
		fr.br.Discard(total)
		b = b[wire.HeaderSize:]
	} else {
		fr.br.Discard(wire.HeaderSize)
		if cap(fr.buf) < n+wire.TrailerLen {
			fr.buf = make([]byte, n+wire.TrailerLen)
		}
		b = fr.buf[:n+wire.TrailerLen]
		if _, err := io.ReadFull(fr.br, b); err != nil {
			return wire.Frame{}, fmt.Errorf("frame of %d bytes: %w", n, unexpected(err))
		}
	}
	if binary.BigEndian.Uint32(b[n:]) != crc32.Checksum(b[:n], castagnoli) {
		return wire.Frame{}, errors.New("frame payload checksum mismatch")
	}
	return wire.Frame{Type: t, Payload: b[:n]}, nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// respHead is the part of a wire.EvidenceResponse a verifier checks on
// every response; the decoder skips the other fields (the evidence) without
// copying them.
type respHead struct {
	ID    uint64 `cbor:"1,keyasint"`
	Part  uint32 `cbor:"7,keyasint,omitempty"`
	More  bool   `cbor:"8,keyasint,omitempty"`
	Early bool   `cbor:"10,keyasint,omitempty"`
}

// readResponse reads the response to request id: its one frame (P3's
// evidence is far below wire.EvidenceChunk), or, for a request with Early,
// the early part that carries the evidence's end and then the last part
// with the quote; each frame checked and its header fields decoded. It
// returns the last frame, whose payload is valid until the next read, and
// with keep copies of the early frames' payloads (see decodeFull).
func (fr *frameReader) readResponse(id uint64, keep bool) (wire.Frame, [][]byte, error) {
	var early [][]byte
	for part := uint32(0); ; part++ {
		f, err := fr.next()
		if err != nil {
			return f, nil, err
		}
		switch f.Type {
		case wire.TypeError:
			var we wire.Error
			if err := wire.Decode(f, &we); err != nil {
				return f, nil, err
			}
			return f, nil, &we
		case wire.TypeEvidenceResponse:
		default:
			return f, nil, fmt.Errorf("got a %s frame, want an evidence response", f.Type)
		}
		var h respHead
		if err := cbor.Unmarshal(f.Payload, &h); err != nil {
			return f, nil, fmt.Errorf("decode evidence response: %w", err)
		}
		if h.ID != id || h.Part != part {
			return f, nil, fmt.Errorf("evidence response ID %d part %d, want request %d part %d", h.ID, h.Part, id, part)
		}
		if !h.Early {
			if h.More {
				return f, nil, fmt.Errorf("evidence response %d part %d: more parts follow, want the evidence in one part after the early one", id, part)
			}
			return f, early, nil
		}
		if !h.More || part > 0 {
			return f, nil, fmt.Errorf("evidence response %d part %d: early part %d (more: %v), want one early part before the last", id, part, part, h.More)
		}
		if keep {
			early = append(early, append([]byte(nil), f.Payload...))
		}
	}
}

// decodeFull decodes a response readResponse returned, copying it, and
// joins its early part (if any) as wire.Assembler does.
func decodeFull(f wire.Frame, early [][]byte) (*wire.EvidenceResponse, error) {
	var a wire.Assembler
	for _, p := range early {
		var resp wire.EvidenceResponse
		if err := wire.Decode(wire.Frame{Type: wire.TypeEvidenceResponse, Payload: p}, &resp); err != nil {
			return nil, err
		}
		if _, err := a.Add(&resp); err != nil {
			return nil, err
		}
	}
	f.Payload = append([]byte(nil), f.Payload...)
	var resp wire.EvidenceResponse
	if err := wire.Decode(f, &resp); err != nil {
		return nil, err
	}
	whole, err := a.Add(&resp)
	if err != nil {
		return nil, err
	}
	if whole == nil {
		return nil, fmt.Errorf("evidence response %d: incomplete", resp.ID)
	}
	return whole, nil
}
