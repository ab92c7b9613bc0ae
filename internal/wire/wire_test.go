package wire

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"strings"
	"testing"
	"time"
)

func frames(t *testing.T, n int) ([]byte, []Measurements) {
	t.Helper()
	var out []byte
	var msgs []Measurements
	for i := 0; i < n; i++ {
		m := Measurements{Seq: uint64(i), First: uint64(i * 3), Entries: []Entry{
			{PCR: 10, HashAlg: "sha1", TemplateHash: bytes.Repeat([]byte{byte(i)}, 20), Template: "ima-ng", Data: bytes.Repeat([]byte{'x'}, i*50)},
		}}
		b, err := Encode(TypeMeasurements, &m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
		msgs = append(msgs, m)
	}
	return out, msgs
}

func readAll(t *testing.T, r *Reader) []Measurements {
	t.Helper()
	var got []Measurements
	for {
		f, err := r.Next()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return got
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		var m Measurements
		if err := Decode(f, &m); err != nil {
			t.Fatal(err)
		}
		got = append(got, m)
	}
}

func TestRoundTrip(t *testing.T) {
	stream, want := frames(t, 20)
	got := readAll(t, NewReader(bytes.NewReader(stream), false))
	if len(got) != len(want) {
		t.Fatalf("%d frames, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i].Seq != want[i].Seq || !bytes.Equal(got[i].Entries[0].Data, want[i].Entries[0].Data) {
			t.Fatalf("frame %d differs", i)
		}
	}
}

// TestResync: a virtio-serial stream with garbage, a torn frame (an agent
// that died mid-write) and a corrupted frame still yields every intact
// frame, in order.
func TestResync(t *testing.T) {
	stream, want := frames(t, 10)
	one, _ := Encode(TypeMeasurements, &Measurements{Seq: 99, Entries: []Entry{{Template: "ima-ng", HashAlg: "sha1", TemplateHash: make([]byte, 20)}}})
	var s []byte
	s = append(s, []byte("garbage TM\x01 more garbage T")...)
	s = append(s, one[:len(one)/2]...) // torn frame
	s = append(s, stream[:len(stream)/2]...)
	bad := append([]byte(nil), one...)
	bad[HeaderSize+2] ^= 0xff // payload corrupted
	s = append(s, bad...)
	s = append(s, stream[len(stream)/2:]...)
	// The split above may cut a frame of stream in two with bad between:
	// count only frames that survive whole.
	r := NewReader(bytes.NewReader(s), true)
	got := readAll(t, r)
	seen := map[uint64]bool{}
	for _, m := range got {
		if m.Seq == 99 {
			t.Fatal("a corrupted or torn frame was delivered")
		}
		seen[m.Seq] = true
	}
	if len(seen) < len(want)-1 {
		t.Fatalf("recovered %d of %d frames", len(seen), len(want))
	}
	skippedBytes, badFrames := r.Skipped()
	if skippedBytes == 0 || badFrames == 0 {
		t.Fatalf("skipped %d bytes, %d bad frames: garbage was not noticed", skippedBytes, badFrames)
	}
	for i := 1; i < len(got); i++ {
		if got[i].Seq <= got[i-1].Seq {
			t.Fatal("frames out of order")
		}
	}
}

func TestStrictReaderRefusesGarbage(t *testing.T) {
	stream, _ := frames(t, 1)
	tests := []struct {
		name   string
		mutate func([]byte) []byte
		want   error
	}{
		{"magic", func(b []byte) []byte { b[0] = 'X'; return b }, ErrBadMagic},
		{"header crc", func(b []byte) []byte { b[9] ^= 1; return b }, ErrHeaderCRC},
		{"payload crc", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, ErrPayloadCRC},
		{"truncated", func(b []byte) []byte { return b[:len(b)-3] }, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.mutate(append([]byte(nil), stream...))
			_, err := NewReader(bytes.NewReader(b), false).Next()
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	if _, err := AppendFrame(nil, TypeMeasurements, make([]byte, MaxPayload+1)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("encode oversize: %v", err)
	}
	big, _ := AppendFrame(nil, TypeMeasurements, make([]byte, 1000))
	r := NewReader(bytes.NewReader(big), false)
	r.SetMaxPayload(999)
	if _, err := r.Next(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("read oversize: %v", err)
	}
	// Too many entries in one frame.
	m := Measurements{Entries: make([]Entry, MaxEntries+1)}
	b, err := Encode(TypeMeasurements, &m)
	if err != nil {
		t.Fatal(err)
	}
	f, err := NewReader(bytes.NewReader(b), false).Next()
	if err != nil {
		t.Fatal(err)
	}
	if err := Decode(f, &Measurements{}); err == nil || !strings.Contains(err.Error(), "exceeded max number of elements") {
		t.Fatalf("decode %d entries: %v", MaxEntries+1, err)
	}
	// A frame decoded as the wrong message type.
	if err := Decode(Frame{Type: TypeAck}, &Hello{}); err == nil {
		t.Fatal("decoded an ack as a hello")
	}
}

func FuzzReader(f *testing.F) {
	stream, _ := framesF(3)
	f.Add(stream, true)
	f.Add(stream, false)
	f.Add([]byte("TM\x01\x03\x00\x00\x00\x05"), true)
	f.Fuzz(func(t *testing.T, b []byte, resync bool) {
		r := NewReader(bytes.NewReader(b), resync)
		for i := 0; i < 1000; i++ {
			fr, err := r.Next()
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxPayload {
				t.Fatalf("payload of %d bytes", len(fr.Payload))
			}
			var m Measurements
			var h Hello
			_ = Decode(fr, &m)
			_ = Decode(fr, &h)
		}
	})
}

func framesF(n int) ([]byte, error) {
	var out []byte
	for i := 0; i < n; i++ {
		b, err := Encode(TypeMeasurements, &Measurements{Seq: uint64(i), Entries: []Entry{{Template: "ima-ng"}}})
		if err != nil {
			return nil, err
		}
		out = append(out, b...)
	}
	return out, nil
}

func TestResyncRandomGarbage(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	stream, want := frames(t, 5)
	for trial := 0; trial < 200; trial++ {
		g := make([]byte, rng.Intn(300))
		rng.Read(g)
		s := append(append(g, stream...), g...)
		got := readAll(t, NewReader(bytes.NewReader(s), true))
		if len(got) < len(want) {
			t.Fatalf("trial %d: %d of %d frames", trial, len(got), len(want))
		}
	}
}

// TestTornFrameOnLiveStream: on a stream that never ends (virtio-serial), a
// torn frame followed by a new frame must yield the new frame, not wait for
// bytes that will never come.
func TestTornFrameOnLiveStream(t *testing.T) {
	pr, pw := io.Pipe()
	defer pw.Close()
	full, _ := Encode(TypeMeasurements, &Measurements{Seq: 1, Entries: []Entry{{Template: "ima-ng", Data: make([]byte, 4000)}}})
	hello, _ := Encode(TypeHello, &Hello{Proto: Version, BootID: "b"})
	go func() {
		pw.Write(full[:len(full)/3])
		pw.Write(hello)
		// and then nothing: the stream stays open
	}()
	got := make(chan Frame, 1)
	go func() {
		f, err := NewReader(pr, true).Next()
		if err == nil {
			got <- f
		}
	}()
	select {
	case f := <-got:
		if f.Type != TypeHello {
			t.Fatalf("got a %s frame", f.Type)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("reader waits forever behind a torn frame")
	}
}

// TestEncodeInPlace: Encode, which encodes the payload in place, writes
// byte for byte the frame AppendFrame makes of the message's encoding, and
// an evidence response's frame fits the buffer its size hint made (no
// second copy of the evidence while the buffer grows).
func TestEncodeInPlace(t *testing.T) {
	big := bytes.Repeat([]byte{0xa5}, 72<<10)
	cases := []struct {
		name string
		t    Type
		m    any
	}{
		{"ping", TypePing, &Ping{Seq: 7}},
		{"measurements", TypeMeasurements, &Measurements{Seq: 1, First: 2, Entries: []Entry{{PCR: 10, HashAlg: "sha256", TemplateHash: make([]byte, 32), Template: "ima-ng", Data: []byte("data")}}}},
		{"evidence, empty", TypeEvidenceResponse, &EvidenceResponse{ID: 1}},
		{"evidence, 72 KiB, every field", TypeEvidenceResponse, &EvidenceResponse{ID: 1 << 60, Evidence: big, UUID: [16]byte{1}, Instance: [16]byte{2}, Key: [32]byte{3},
			AKPEM: bytes.Repeat([]byte{'k'}, 180), Part: 1 << 31, More: true, Total: 1 << 62}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Encode(c.t, c.m)
			if err != nil {
				t.Fatal(err)
			}
			p, err := encMode.Marshal(c.m)
			if err != nil {
				t.Fatal(err)
			}
			want, err := AppendFrame(nil, c.t, p)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("Encode gives %d bytes, AppendFrame of the encoding %d, and they differ", len(got), len(want))
			}
			if h, ok := c.m.(sizeHinter); ok && len(p) > h.sizeHint() {
				t.Errorf("encoding of %d bytes exceeds the size hint %d", len(p), h.sizeHint())
			}
		})
	}
}
