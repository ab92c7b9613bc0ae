package wire

import (
	"errors"
	"fmt"
)

// EvidenceChunk is the most evidence bytes one EvidenceResponse frame
// carries: well under MaxPayload, so a part with its identity and AK always
// fits a frame, and small enough that the bridge, streaming evidence to
// many guests at once, holds little per request (a frame's encoding is a
// few copies of its part).
const EvidenceChunk = 1 << 20

// MaxEvidence bounds the evidence a receiver assembles from parts (a log of
// about 16M entries; incremental evidence keeps real requests far smaller).
const MaxEvidence = 1 << 30

// EvidenceParts splits resp into the responses to send, in order. The
// parts share resp's evidence bytes (no copy). Evidence of at most chunk
// bytes (EvidenceChunk when chunk ≤ 0) is one part, resp itself.
func EvidenceParts(resp *EvidenceResponse, chunk int) []*EvidenceResponse {
	if chunk <= 0 {
		chunk = EvidenceChunk
	}
	if len(resp.Evidence) <= chunk {
		return []*EvidenceResponse{resp}
	}
	var parts []*EvidenceResponse
	for off, i := 0, 0; off < len(resp.Evidence); off, i = off+chunk, i+1 {
		end := min(off+chunk, len(resp.Evidence))
		p := &EvidenceResponse{ID: resp.ID, Part: uint32(i), Evidence: resp.Evidence[off:end], More: end < len(resp.Evidence)}
		if i == 0 {
			p.UUID, p.Instance, p.Key, p.AKPEM = resp.UUID, resp.Instance, resp.Key, resp.AKPEM
			p.Total = uint64(len(resp.Evidence))
		}
		parts = append(parts, p)
	}
	return parts
}

// Assembler joins the parts of one chunked evidence response. A response
// that is not chunked (part 0 without More) is complete at once. Early
// parts (EvidenceResponse.Early) come before all others and hold the
// evidence's end: the assembled evidence is the other parts' bytes, then
// the early parts'. The last part is never early (it carries the quote).
type Assembler struct {
	resp  *EvidenceResponse
	next  uint32
	early []byte // the early parts' bytes so far
	rest  bool   // a part that is not early has come
}

// Errors of Assembler.Add.
var ErrBadPart = errors.New("evidence part out of order or inconsistent")

// Add takes the next part; it returns the whole response once the last part
// has arrived. Parts must come in order, with the request's ID, early parts
// first and never last, and the total stated in part 0 (at most
// MaxEvidence) must match.
func (a *Assembler) Add(m *EvidenceResponse) (*EvidenceResponse, error) {
	if m.Part != a.next {
		return nil, fmt.Errorf("%w: got part %d, want %d", ErrBadPart, m.Part, a.next)
	}
	if m.Early && a.rest {
		return nil, fmt.Errorf("%w: early part %d after a part of the evidence's start", ErrBadPart, m.Part)
	}
	if m.Early && !m.More {
		return nil, fmt.Errorf("%w: early part %d is the last (the last part carries the quote)", ErrBadPart, m.Part)
	}
	if a.resp == nil {
		if !m.More {
			return m, nil
		}
		if m.Total > MaxEvidence {
			return nil, fmt.Errorf("%w: evidence of %d bytes exceeds the limit of %d", ErrBadPart, m.Total, MaxEvidence)
		}
		if m.Total != 0 && m.Total < uint64(len(m.Evidence)) {
			return nil, fmt.Errorf("%w: part 0 of %d bytes, total %d", ErrBadPart, len(m.Evidence), m.Total)
		}
		r := *m
		r.Evidence = make([]byte, 0, max(min(m.Total, 64<<20), uint64(len(m.Evidence))))
		if m.Early {
			r.Evidence = r.Evidence[:0:0]
			a.early = append(a.early[:0], m.Evidence...)
		} else {
			r.Evidence = append(r.Evidence, m.Evidence...)
			a.rest = true
		}
		r.More, r.Part, r.Early = false, 0, false
		a.resp, a.next = &r, 1
		return nil, nil
	}
	if m.ID != a.resp.ID {
		return nil, fmt.Errorf("%w: part of response %d inside response %d", ErrBadPart, m.ID, a.resp.ID)
	}
	limit := a.resp.Total
	if limit == 0 {
		limit = MaxEvidence
	}
	if uint64(len(a.resp.Evidence)+len(a.early)+len(m.Evidence)) > limit {
		return nil, fmt.Errorf("%w: parts exceed %d bytes", ErrBadPart, limit)
	}
	a.next++
	if m.Early {
		a.early = append(a.early, m.Evidence...)
		return nil, nil
	}
	if !a.rest && !m.More && len(a.early) > 0 {
		// The usual early response: one early part, then the start.
		ev := make([]byte, 0, len(m.Evidence)+len(a.early))
		a.resp.Evidence = append(append(ev, m.Evidence...), a.early...)
	} else {
		a.resp.Evidence = append(a.resp.Evidence, m.Evidence...)
		if !m.More {
			a.resp.Evidence = append(a.resp.Evidence, a.early...)
		}
	}
	a.rest = true
	if m.More {
		return nil, nil
	}
	if a.resp.Total != 0 && uint64(len(a.resp.Evidence)) != a.resp.Total {
		return nil, fmt.Errorf("%w: %d bytes assembled, total %d", ErrBadPart, len(a.resp.Evidence), a.resp.Total)
	}
	return a.resp, nil
}
