package wire

import (
	"bytes"
	"crypto/sha1"
	"fmt"
	"testing"
)

// benchEntries makes n ima-ng-shaped entries (d-ng sha256 digest and a
// path) as the agent sends them.
func benchEntries(n int) []Entry {
	es := make([]Entry, n)
	for i := range es {
		data := make([]byte, 0, 96)
		data = append(data, 40, 0, 0, 0)
		data = append(data, "sha256:\x00"...)
		data = append(data, bytes.Repeat([]byte{byte(i)}, 32)...)
		path := fmt.Sprintf("/usr/lib/x86_64-linux-gnu/lib%04d.so\x00", i)
		data = append(data, byte(len(path)), 0, 0, 0)
		data = append(data, path...)
		h := sha1.Sum(data)
		es[i] = Entry{PCR: 10, HashAlg: "sha1", TemplateHash: h[:], Template: "ima-ng", Data: data}
	}
	return es
}

// BenchmarkMeasurementsFrame is the bridge's cost to read and decode one
// measurement frame (per entry in ns/entry), the first step of ingest.
func BenchmarkMeasurementsFrame(b *testing.B) {
	for _, n := range []int{8, 64, 400} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			frame, err := Encode(TypeMeasurements, &Measurements{Seq: 1, First: 100, Entries: benchEntries(n)})
			if err != nil {
				b.Fatal(err)
			}
			var stream bytes.Reader
			b.ReportAllocs()
			b.SetBytes(int64(len(frame)))
			for b.Loop() {
				stream.Reset(frame)
				f, err := NewReader(&stream, false).Next()
				if err != nil {
					b.Fatal(err)
				}
				var m Measurements
				if err := Decode(f, &m); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/entry")
		})
	}
}

// BenchmarkEncodeAck is the bridge's cost of one acknowledgement.
func BenchmarkEncodeAck(b *testing.B) {
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if _, err := Encode(TypeAck, &Ack{Seq: uint64(i), Next: uint64(i) * 64}); err != nil {
			b.Fatal(err)
		}
	}
}
