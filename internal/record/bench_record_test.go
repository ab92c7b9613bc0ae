package record_test

import (
	"crypto/sha256"
	"testing"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
)

// benchMeasurement is a realistic measurement record: one ima-ng entry of
// a file under /usr/bin, as the bridge records it.
func benchMeasurement() *record.Record {
	d := sha256.Sum256([]byte("bench"))
	e := ima.NewIMANG(10, "sha256", d[:], "/usr/lib/x86_64-linux-gnu/libbench.so.1.2.3")
	return &record.Record{Kind: record.KindMeasurement, Time: 1_790_000_000_000_000_000, Measurement: &record.Measurement{
		PCR: e.PCR, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
		TemplateData: e.TemplateData, LogIndex: 123456, BootID: "0e8e7a0c-5b8a-4b43-9d53-6f1f2b3c4d5e",
	}}
}

// BenchmarkMarshalMeasurement is the bridge's per-record encoding cost (R).
func BenchmarkMarshalMeasurement(b *testing.B) {
	r := benchMeasurement()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Marshal(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnmarshalMeasurement is the verifier's per-record decoding cost
// (decode, validate, re-encode to check canonical form).
func BenchmarkUnmarshalMeasurement(b *testing.B) {
	raw, err := benchMeasurement().Marshal()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		if _, err := record.Unmarshal(raw); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCheckTemplateHash is the bridge's and the verifier's template
// hash check (SHA-1 of the template data).
func BenchmarkCheckTemplateHash(b *testing.B) {
	m := benchMeasurement().Measurement
	b.ReportAllocs()
	for b.Loop() {
		if err := m.CheckTemplateHash(); err != nil {
			b.Fatal(err)
		}
	}
}
