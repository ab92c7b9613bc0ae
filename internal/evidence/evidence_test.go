package evidence

import (
	"bytes"
	"encoding/json"
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

func FuzzDecode(f *testing.F) {
	bin, _ := sample().MarshalBinary()
	js, _ := json.Marshal(sample())
	f.Add(bin)
	f.Add(js)
	f.Fuzz(func(t *testing.T, b []byte) {
		ev, err := Decode(b)
		if err != nil {
			return
		}
		for _, bt := range ev.Log {
			if len(bt.Entries)%conceal.EntrySize != 0 {
				t.Fatalf("accepted entries of %d bytes", len(bt.Entries))
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
