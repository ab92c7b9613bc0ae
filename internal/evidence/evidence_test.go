package evidence

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

func sample() *Evidence {
	return &Evidence{
		Version: Version, Kind: KindQuote, PCR: 13,
		Quote:     Quote{Attest: []byte{1, 2}, Signature: []byte{3}},
		PCRValues: []PCRValue{{Index: 23, SHA256: bytes.Repeat([]byte{7}, 32)}},
		Epoch:     Epoch{Number: 1, Record: []byte{0xa0}},
		Log:       []LogBatch{{G0: 0, Entries: bytes.Repeat([]byte{9}, 128)}, {G0: 3, Entries: bytes.Repeat([]byte{8}, 64)}},
		VM:        VM{UUID: "u", Instance: []byte{1}},
		Records:   []Record{{G: 1, R: []byte{0xa1}}},
	}
}

func TestRoundTrips(t *testing.T) {
	ev := sample()
	bin, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	for name, in := range map[string][]byte{"cbor": bin, "json": js} {
		back, err := Decode(in)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		again, _ := back.MarshalBinary()
		if !bytes.Equal(again, bin) {
			t.Fatalf("%s: round trip changed the evidence", name)
		}
	}
	if !strings.Contains(string(js), `"entries":["`+strings.Repeat("09", 64)+`"`) {
		t.Fatalf("JSON entries are not one hex string per entry: %s", js)
	}
}

func TestDecodeRejects(t *testing.T) {
	ev := sample()
	ev.Version = 2
	v2, _ := ev.MarshalBinary()
	bad := sample()
	bad.Log[0].Entries = bad.Log[0].Entries[:100]
	badBin, _ := encMode.Marshal(struct {
		V uint32 `cbor:"1,keyasint"`
		L []struct {
			G0 uint64 `cbor:"1,keyasint"`
			E  []byte `cbor:"2,keyasint"`
		} `cbor:"8,keyasint"`
	}{V: 1, L: []struct {
		G0 uint64 `cbor:"1,keyasint"`
		E  []byte `cbor:"2,keyasint"`
	}{{0, make([]byte, 100)}}})
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"version 2", v2, "version 2"},
		{"entries not a multiple of 64", badBin, "multiple of 64"},
		{"unknown JSON field", []byte(`{"version":1,"bogus":1}`), "unknown field"},
		{"bad hex", []byte(`{"version":1,"ak":"zz"}`), "invalid byte"},
		{"garbage", []byte{0xff, 0x00}, "decode evidence CBOR"},
		{"indefinite length", []byte{0xbf, 0x01, 0x01, 0xff}, "indefinite"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Decode = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

// chained is sample() as the evidence of a VM that migrated twice: two
// previous (final) segments.
func chained() *Evidence {
	ev := sample()
	for i := range 2 {
		p := sample()
		p.Kind = KindFinal
		p.Host = fmt.Sprint("host", i)
		ev.Previous = append(ev.Previous, *p)
	}
	return ev
}

// TestPrevious: the earlier segments of a migrated VM round-trip in both
// encodings (CBOR key 14, JSON "previous"), as a chain stored on its own,
// and the decoder refuses more than MaxSegments of them and any nesting.
func TestPrevious(t *testing.T) {
	ev := chained()
	bin, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	js, _ := json.Marshal(ev)
	if !strings.Contains(string(js), `"previous":[{"version":1,"kind":"final"`) {
		t.Fatalf("JSON lacks the previous segments: %.200s", js)
	}
	for name, in := range map[string][]byte{"cbor": bin, "json": js} {
		back, err := Decode(in)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if again, _ := back.MarshalBinary(); !bytes.Equal(again, bin) {
			t.Fatalf("%s: round trip changed the evidence", name)
		}
		segs := back.Segments()
		if len(segs) != 3 || segs[0].Host != "host0" || segs[2].Previous != nil || back.Previous == nil {
			t.Fatalf("%s: segments %d", name, len(segs))
		}
	}
	chain, err := EncodeChain(ev.Chain())
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeChain(chain)
	if err != nil || len(back) != 3 || back[2].Kind != KindQuote || back[2].Previous != nil {
		t.Fatalf("chain round trip: %v %d", err, len(back))
	}

	tooMany := sample()
	for range MaxSegments + 1 {
		tooMany.Previous = append(tooMany.Previous, *sample())
	}
	nested := chained()
	nested.Previous[1].Previous = []Evidence{*sample()}
	oldInner := chained()
	oldInner.Previous[0].Version = 2
	tests := []struct {
		name string
		ev   *Evidence
		want string
	}{
		{"65 segments", tooMany, "limit 64"},
		{"nested", nested, "flat list"},
		{"old segment version", oldInner, "previous segment 0: evidence version 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bin, err := tt.ev.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			js, _ := json.Marshal(tt.ev)
			for _, in := range [][]byte{bin, js} {
				if _, err := Decode(in); err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("Decode = %v, want an error containing %q", err, tt.want)
				}
			}
			if c, _ := EncodeChain(tt.ev.Chain()); tt.name != "65 segments" {
				if _, err := DecodeChain(c); err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Fatalf("DecodeChain = %v, want an error containing %q", err, tt.want)
				}
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	bin, _ := sample().MarshalBinary()
	js, _ := json.Marshal(sample())
	f.Add(bin)
	f.Add(js)
	cbin, _ := chained().MarshalBinary()
	cjs, _ := json.Marshal(chained())
	f.Add(cbin)
	f.Add(cjs)
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := Decode(b)
		if err != nil {
			return
		}
		if len(ev.Previous) > MaxSegments {
			t.Fatalf("accepted %d previous segments", len(ev.Previous))
		}
		for _, seg := range ev.Segments() {
			if len(seg.Previous) > 0 {
				t.Fatalf("accepted a nested previous segment")
			}
			for _, bt := range seg.Log {
				if len(bt.Entries)%conceal.EntrySize != 0 {
					t.Fatalf("accepted entries of %d bytes", len(bt.Entries))
				}
			}
		}
		for _, p := range ev.Previous {
			if len(p.Previous) > 0 {
				t.Fatalf("accepted a nested previous segment")
			}
		}
		if _, err := ev.MarshalBinary(); err != nil {
			t.Fatalf("decoded evidence does not re-encode: %v", err)
		}
	})
}

// TestTrailingBytesRejected: evidence is exactly one JSON object or one CBOR
// item; anything after it (a second object, garbage) is refused, so two
// parsers can never read different evidence from one file. Trailing
// whitespace (a newline at the end of a file) is fine.
func TestTrailingBytesRejected(t *testing.T) {
	ev := sample()
	js, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := ev.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		in   []byte
		ok   bool
	}{
		{"json", js, true},
		{"json with a newline", append(slices.Clone(js), '\n', ' '), true},
		{"json then another object", append(slices.Clone(js), js...), false},
		{"json then garbage", append(slices.Clone(js), 'x'), false},
		{"cbor", cb, true},
		{"cbor then a byte", append(slices.Clone(cb), 0), false},
		{"cbor twice", append(slices.Clone(cb), cb...), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("Decode: %v, want ok=%v", err, tt.ok)
			}
		})
	}
}
