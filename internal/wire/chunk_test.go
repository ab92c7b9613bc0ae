package wire

import (
	"bytes"
	"errors"
	"testing"
)

// TestEvidenceParts: evidence split into parts is joined back exactly;
// parts out of order, of another response, or beyond the stated total are
// refused.
func TestEvidenceParts(t *testing.T) {
	ev := bytes.Repeat([]byte("0123456789abcdef"), 1000) // 16000 bytes
	resp := &EvidenceResponse{ID: 9, Evidence: ev, UUID: [16]byte{1}, Key: [32]byte{2}, AKPEM: []byte("pem")}
	for _, chunk := range []int{7, 100, 15999, 16000, 1 << 20} {
		parts := EvidenceParts(resp, chunk)
		if want := (len(ev) + chunk - 1) / chunk; len(parts) != want {
			t.Fatalf("chunk %d: %d parts, want %d", chunk, len(parts), want)
		}
		var a Assembler
		var got *EvidenceResponse
		for i, p := range parts {
			// Every part survives the wire.
			m := overWire(t, p)
			r, err := a.Add(m)
			if err != nil {
				t.Fatalf("chunk %d part %d: %v", chunk, i, err)
			}
			if (r != nil) != (i == len(parts)-1) {
				t.Fatalf("chunk %d part %d of %d: complete = %v", chunk, i, len(parts), r != nil)
			}
			got = r
		}
		if !bytes.Equal(got.Evidence, ev) || got.UUID != resp.UUID || got.Key != resp.Key || string(got.AKPEM) != "pem" || got.ID != 9 || got.More {
			t.Fatalf("chunk %d: reassembled %d bytes, fields %+v", chunk, len(got.Evidence), got.UUID)
		}
	}
	parts := EvidenceParts(resp, 5000) // 4 parts
	tests := []struct {
		name string
		seq  []*EvidenceResponse
	}{
		{"skipped part", []*EvidenceResponse{parts[0], parts[2]}},
		{"repeated part", []*EvidenceResponse{parts[0], parts[1], parts[1]}},
		{"starts mid-way", []*EvidenceResponse{parts[1]}},
		{"another response", []*EvidenceResponse{parts[0], {ID: 8, Part: 1, Evidence: []byte("x"), More: true}}},
		{"over the total", []*EvidenceResponse{parts[0], parts[1], parts[2], {ID: 9, Part: 3, Evidence: make([]byte, 1001)}}},
		{"short of the total", []*EvidenceResponse{parts[0], parts[1], parts[2], {ID: 9, Part: 3, Evidence: make([]byte, 999)}}},
		{"total over the limit", []*EvidenceResponse{{ID: 9, Evidence: []byte("x"), More: true, Total: MaxEvidence + 1}}},
		{"early part after the start", []*EvidenceResponse{parts[0], {ID: 9, Part: 1, Evidence: []byte("x"), More: true, Early: true}}},
		{"early part last", []*EvidenceResponse{{ID: 9, Evidence: []byte("x"), More: true, Early: true}, {ID: 9, Part: 1, Evidence: []byte("y"), Early: true}}},
		{"lone early part", []*EvidenceResponse{{ID: 9, Evidence: []byte("x"), Early: true}}},
		{"early parts over the total", []*EvidenceResponse{{ID: 9, Evidence: make([]byte, 10), More: true, Early: true, Total: 15}, {ID: 9, Part: 1, Evidence: make([]byte, 6)}}},
		{"early parts short of the total", []*EvidenceResponse{{ID: 9, Evidence: make([]byte, 10), More: true, Early: true, Total: 17}, {ID: 9, Part: 1, Evidence: make([]byte, 6)}}},
	}
	for _, tt := range tests {
		var a Assembler
		var err error
		for _, p := range tt.seq {
			if _, err = a.Add(p); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrBadPart) {
			t.Errorf("%s: err %v, want ErrBadPart", tt.name, err)
		}
	}
}

// overWire encodes p into a frame, reads the frame back and decodes it.
func overWire(t *testing.T, p *EvidenceResponse) *EvidenceResponse {
	t.Helper()
	f, err := Encode(TypeEvidenceResponse, p)
	if err != nil {
		t.Fatal(err)
	}
	fr, err := NewReader(bytes.NewReader(f), false).Next()
	if err != nil {
		t.Fatal(err)
	}
	var m EvidenceResponse
	if err := Decode(fr, &m); err != nil {
		t.Fatal(err)
	}
	return &m
}

// earlyParts is how a bridge answers a request with Early: the evidence's
// bytes from at on in early parts of at most chunk bytes, then the bytes
// before at in ordinary parts; part 0 carries the identity.
func earlyParts(resp *EvidenceResponse, at, chunk int) []*EvidenceResponse {
	var parts []*EvidenceResponse
	end := resp.Evidence[at:]
	for off := 0; off < len(end); off += chunk {
		parts = append(parts, &EvidenceResponse{ID: resp.ID, Evidence: end[off:min(off+chunk, len(end))], More: true, Early: true})
	}
	for _, p := range EvidenceParts(&EvidenceResponse{ID: resp.ID, Evidence: resp.Evidence[:at]}, chunk) {
		p.Total = 0
		parts = append(parts, p)
	}
	for i, p := range parts {
		p.Part = uint32(i)
		if i == 0 {
			p.UUID, p.Instance, p.Key, p.AKPEM = resp.UUID, resp.Instance, resp.Key, resp.AKPEM
		}
	}
	return parts
}

// TestEarlyParts: evidence whose end came first, in early parts, is
// joined back exactly, wherever it was split and however it was chunked,
// and the parts survive the wire.
func TestEarlyParts(t *testing.T) {
	ev := bytes.Repeat([]byte("0123456789abcdef"), 100) // 1600 bytes
	resp := &EvidenceResponse{ID: 9, Evidence: ev, UUID: [16]byte{1}, Key: [32]byte{2}, AKPEM: []byte("pem")}
	for _, at := range []int{0, 1, 700, 1599} {
		for _, chunk := range []int{7, 700, 1600, 1 << 20} {
			parts := earlyParts(resp, at, chunk)
			var a Assembler
			var got *EvidenceResponse
			for i, p := range parts {
				m := overWire(t, p)
				if m.Early != p.Early {
					t.Fatalf("at %d chunk %d part %d: Early %v after the wire, sent %v", at, chunk, i, m.Early, p.Early)
				}
				r, err := a.Add(m)
				if err != nil {
					t.Fatalf("at %d chunk %d part %d: %v", at, chunk, i, err)
				}
				if (r != nil) != (i == len(parts)-1) {
					t.Fatalf("at %d chunk %d part %d of %d: complete = %v", at, chunk, i, len(parts), r != nil)
				}
				got = r
			}
			if !bytes.Equal(got.Evidence, ev) || got.UUID != resp.UUID || got.Key != resp.Key || string(got.AKPEM) != "pem" || got.ID != 9 || got.More || got.Early {
				t.Fatalf("at %d chunk %d: reassembled %q", at, chunk, got.Evidence)
			}
		}
	}
}

// FuzzAssembler: whatever parts arrive, the assembler never panics, never
// returns more than the limit, and a response it completes is the
// concatenation of what it accepted.
func FuzzAssembler(f *testing.F) {
	f.Add([]byte("abcdefgh"), uint8(3), uint64(0), uint8(0))
	f.Add([]byte("abcdefgh"), uint8(3), uint64(8), uint8(1))
	f.Add([]byte{}, uint8(0), uint64(1<<40), uint8(2))
	f.Add([]byte("abcdefgh"), uint8(2), uint64(0), uint8(0x83))
	f.Add([]byte("abcdefgh"), uint8(2), uint64(0), uint8(0xc3))
	f.Fuzz(func(t *testing.T, ev []byte, chunk uint8, total uint64, mangle uint8) {
		parts := EvidenceParts(&EvidenceResponse{ID: 1, Evidence: ev}, int(chunk)%17+1)
		if mangle&0x80 != 0 && len(ev) > 0 {
			parts = earlyParts(&EvidenceResponse{ID: 1, Evidence: ev}, int(mangle&0x7f)%len(ev), int(chunk)%17+1)
		}
		if mangle&0x40 != 0 && len(parts) > 1 {
			parts[len(parts)-1-int(chunk)%len(parts)].Early = chunk&1 == 0
		}
		if len(parts) > 0 && mangle%3 == 1 {
			parts[0].Total = total
		}
		if len(parts) > 1 && mangle%3 == 2 {
			parts[1].Part += uint32(mangle)
		}
		var a Assembler
		for _, p := range parts {
			r, err := a.Add(p)
			if err != nil {
				return
			}
			if r != nil {
				if len(r.Evidence) > MaxEvidence {
					t.Fatal("over the limit")
				}
				if mangle%3 == 0 && mangle&0x40 == 0 && !bytes.Equal(r.Evidence, ev) {
					t.Fatalf("reassembled %x, sent %x", r.Evidence, ev)
				}
			}
		}
	})
}
