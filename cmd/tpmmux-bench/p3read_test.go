package main

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/wire"
)

// TestFrameReader: the P3 verifiers' reader takes frames as wire.Encode
// writes them, checks them as wire.Reader does (a flipped bit in the
// header or the payload is an error, not a response) and answers only the
// request it is waiting for; decodeFull gives back every field.
func TestFrameReader(t *testing.T) {
	resp := &wire.EvidenceResponse{ID: 7, Evidence: bytes.Repeat([]byte{0x5a}, 72<<10), UUID: [16]byte{1}, Instance: [16]byte{2}, Key: [32]byte{3}, AKPEM: []byte("pem")}
	good, err := wire.Encode(wire.TypeEvidenceResponse, resp)
	if err != nil {
		t.Fatal(err)
	}
	errFrame, err := wire.Encode(wire.TypeError, &wire.Error{Code: wire.CodeEvidence, Message: "no quote"})
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 1
		return b
	}
	// The same response with its end sent early, as the bridge answers a
	// request with Early: an early part, then the start.
	at := 1000
	earlyPart := &wire.EvidenceResponse{ID: 7, Evidence: resp.Evidence[at:], UUID: resp.UUID, Instance: resp.Instance, Key: resp.Key, AKPEM: resp.AKPEM, More: true, Early: true}
	startPart := &wire.EvidenceResponse{ID: 7, Part: 1, Evidence: resp.Evidence[:at]}
	enc := func(ps ...*wire.EvidenceResponse) []byte {
		var b []byte
		for _, p := range ps {
			f, err := wire.Encode(wire.TypeEvidenceResponse, p)
			if err != nil {
				t.Fatal(err)
			}
			b = append(b, f...)
		}
		return b
	}
	lateEarly := *earlyPart
	lateEarly.Part = 1
	earlyLast := *earlyPart
	earlyLast.More = false
	cases := []struct {
		name    string
		stream  []byte
		id      uint64
		wantErr bool
	}{
		{"response", good, 7, false},
		{"early part, then the start", enc(earlyPart, startPart), 7, false},
		{"early part alone", enc(earlyPart), 7, true},
		{"early part last", enc(&earlyLast), 7, true},
		{"two early parts", enc(earlyPart, &lateEarly), 7, true},
		{"start without the early part's number", enc(earlyPart, &wire.EvidenceResponse{ID: 7, Evidence: resp.Evidence[:at]}), 7, true},
		{"early part of another request", enc(&wire.EvidenceResponse{ID: 8, Evidence: []byte("x"), More: true, Early: true}, startPart), 7, true},
		{"another request's response", good, 8, true},
		{"header bit flipped", flip(5), 7, true},
		{"payload bit flipped", flip(wire.HeaderSize + 1000), 7, true},
		{"trailer bit flipped", flip(len(good) - 1), 7, true},
		{"cut short", good[:len(good)-10], 7, true},
		{"error frame", errFrame, 7, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fr := newFrameReader(bytes.NewReader(c.stream))
			f, early, err := fr.readResponse(c.id, true)
			if c.wantErr {
				if err == nil {
					t.Fatal("accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := decodeFull(f, early)
			if err != nil {
				t.Fatal(err)
			}
			if got.ID != resp.ID || !bytes.Equal(got.Evidence, resp.Evidence) || got.UUID != resp.UUID || got.Key != resp.Key || !bytes.Equal(got.AKPEM, resp.AKPEM) {
				t.Fatal("decoded response differs from the one sent")
			}
		})
	}
	// A bridge error arrives as a *wire.Error.
	fr := newFrameReader(bytes.NewReader(errFrame))
	_, _, err = fr.readResponse(1, false)
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wire.CodeEvidence {
		t.Fatalf("error frame gave %v, want the bridge's error", err)
	}
	// A frame larger than the read buffer is read into a buffer of its own,
	// checked the same way.
	big := &wire.EvidenceResponse{ID: 9, Evidence: bytes.Repeat([]byte{0x6b}, 2*frameBuffer)}
	bigFrame, err := wire.Encode(wire.TypeEvidenceResponse, big)
	if err != nil {
		t.Fatal(err)
	}
	fr = newFrameReader(bytes.NewReader(bigFrame))
	if f, _, err := fr.readResponse(9, false); err != nil {
		t.Fatal(err)
	} else if got, err := decodeFull(f, nil); err != nil || !bytes.Equal(got.Evidence, big.Evidence) {
		t.Fatalf("large response: %v", err)
	}
	bad := bytes.Clone(bigFrame)
	bad[len(bad)/2] ^= 1
	if _, _, err := newFrameReader(bytes.NewReader(bad)).readResponse(9, false); err == nil {
		t.Fatal("a large response with a flipped bit was accepted")
	}
	if _, _, err := newFrameReader(bytes.NewReader(bigFrame[:len(bigFrame)-3])).readResponse(9, false); err == nil {
		t.Fatal("a large response cut short was accepted")
	}
	// The buffer is reused: two responses in a row both read.
	fr = newFrameReader(bytes.NewReader(append(bytes.Clone(good), good...)))
	for i := range 2 {
		if _, _, err := fr.readResponse(7, false); err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
	}
}

// TestCycleRate: the rate over whole quote cycles counts the responses
// from the first quote's start to the last one's, over that time, whatever
// part of a burst the fixed window cut off; with fewer than three quotes
// there is no whole cycle pair to measure.
func TestCycleRate(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms float64) time.Time { return t0.Add(time.Duration(ms * float64(time.Millisecond))) }
	// Cycles of 250 ms from 100 ms; 10 responses 210-230 ms after each
	// quote starts; the window began mid-burst (responses at 0-20 ms).
	var starts, ends []time.Time
	for c := 0; c < 4; c++ {
		starts = append(starts, at(100+250*float64(c)))
	}
	for c := -1; c < 4; c++ {
		for i := 0; i < 10; i++ {
			ends = append(ends, at(100+250*float64(c)+210+2*float64(i)))
		}
	}
	got, ok := cycleRate(starts, ends)
	if !ok || got < 39.99 || got > 40.01 {
		t.Fatalf("rate %v (%v), want 40/s (10 responses per 250 ms)", got, ok)
	}
	if _, ok := cycleRate(starts[:2], ends); ok {
		t.Fatal("a rate from two quotes")
	}
}
