package record

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// TestCanonicalBytes pins the canonical encoding of a small record, worked
// out by hand from RFC 8949: map(3) {1: 5, 2: 1, 7: map(1) {1: "x"}}.
func TestCanonicalBytes(t *testing.T) {
	r := &Record{Kind: KindTeardown, Time: 1, Teardown: &Teardown{Reason: "x"}}
	b, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if want := "a3010502010 7a1016178"; hex.EncodeToString(b) != strings.ReplaceAll(want, " ", "") {
		t.Fatalf("encoding = %x, want %s", b, want)
	}
}

func sample() []*Record {
	return []*Record{
		{Kind: KindGenesis, Time: 42, Genesis: &Genesis{UUID: [16]byte{1}, Name: "vm-a", Instance: [16]byte{2}, CID: 3,
			DomainXML: [32]byte{4}, Files: []File{{Role: "kernel", Path: "/boot/vmlinuz", SHA256: bytes.Repeat([]byte{5}, 32)}, {Role: "initrd", Path: "/x", Error: "permission denied"}}}},
		{Kind: KindMeasurement, Time: 43, Measurement: &Measurement{PCR: 10, TemplateHashAlg: "sha1", TemplateHash: make([]byte, 20), Template: "ima-ng", TemplateData: []byte{1, 2, 3}, LogIndex: 7, BootID: "b"}},
		{Kind: KindReboot, Reboot: &Reboot{Reason: "guest-reset"}},
		{Kind: KindBinding, Binding: &Binding{Purpose: "tls", KeyHash: [32]byte{9}}},
		{Kind: KindTeardown, Teardown: &Teardown{Reason: "destroyed"}},
		{Kind: KindAction, Action: &Action{Action: "pause", Detail: "policy"}},
		{Kind: KindMigratedOut, Time: 44, MigratedOut: &MigratedOut{DestHost: "hostb", DestAK: [32]byte{7}, Nonce: [32]byte{8}, Credential: [32]byte{9}}},
		{Kind: KindMigratedIn, Time: 45, MigratedIn: &MigratedIn{UUID: [16]byte{1}, Name: "vm-a", Instance: [16]byte{2}, CID: 3, DomainXML: [32]byte{4},
			Files: []File{{Role: "kernel", Path: "/boot/vmlinuz", SHA256: bytes.Repeat([]byte{5}, 32)}}, Host: "hostb", Epoch: [32]byte{6},
			SourceHost: "hosta", SourceAK: [32]byte{7}, SourceEpoch: [32]byte{8}, Prev: [32]byte{9}, Seq: 12}},
		{Kind: KindMigratedIn, Time: 46, MigratedIn: &MigratedIn{UUID: [16]byte{1}, Name: "vm-t", Instance: [16]byte{2}, DomainXML: [32]byte{4},
			Epoch: [32]byte{6}, SourceAK: [32]byte{7}, SourceEpoch: [32]byte{8}, Prev: [32]byte{9}, Seq: 40,
			VTPMBanks: []uint16{uint16(vpcr.SHA256)}, VPCRs: sampleSnapshot()}},
	}
}

// sampleSnapshot is the vPCR state of a vTPM that ran Startup and one
// extend, as a migrated-in record carries it.
func sampleSnapshot() *vpcr.Snapshot {
	st, err := vpcr.New([]vpcr.Alg{vpcr.SHA256})
	if err != nil {
		panic(err)
	}
	for _, e := range []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Banks: []vpcr.Alg{vpcr.SHA256}},
		{Seq: 3, Kind: vpcr.KindExtend, PCR: 10, Digests: []vpcr.Digest{{Alg: vpcr.SHA256, Value: bytes.Repeat([]byte{3}, 32)}}}} {
		if err := st.Apply(e); err != nil {
			panic(err)
		}
	}
	return st.Snapshot()
}

// TestMigrationRecords: the two migration records round-trip, only
// teardown and migrated-out are terminal, and malformed migrated-in
// records are refused when marshalled and when decoded.
func TestMigrationRecords(t *testing.T) {
	for k := KindGenesis; k <= KindMigratedIn; k++ {
		if want := k == KindTeardown || k == KindMigratedOut; k.Terminal() != want {
			t.Errorf("%s.Terminal() = %v", k, !want)
		}
	}
	if KindMigratedOut.String() != "migrated-out" || KindMigratedIn.String() != "migrated-in" {
		t.Errorf("kind names %q %q", KindMigratedOut, KindMigratedIn)
	}
	in := func() *Record { return sample()[len(sample())-1] }
	tests := []struct {
		name string
		bad  func(r *Record)
		want string
	}{
		{"seq 0", func(r *Record) { r.MigratedIn.Seq = 0 }, "numbered 0"},
		{"vpcrs without banks", func(r *Record) { r.MigratedIn.VTPMBanks = nil }, "declares no vTPM"},
		{"banks without vpcrs", func(r *Record) { r.MigratedIn.VPCRs = nil }, "without its vPCR snapshot"},
		{"short pcr", func(r *Record) { r.MigratedIn.VPCRs.Values[0].PCRs[3] = []byte{1} }, "bytes"},
		{"unknown bank", func(r *Record) { r.MigratedIn.VPCRs.Active = []vpcr.Alg{0x99} }, "banks"},
		{"long host", func(r *Record) { r.MigratedIn.Host = strings.Repeat("h", 4097) }, "name of more"},
		{"two bodies", func(r *Record) { r.MigratedOut = &MigratedOut{} }, "bodies"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := in()
			tt.bad(r)
			if _, err := r.Marshal(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Marshal = %v, want an error containing %q", err, tt.want)
			}
			if _, err := Unmarshal(mustMarshalRaw(r)); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Unmarshal = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

func TestRoundTrip(t *testing.T) {
	for _, r := range sample() {
		b, err := r.Marshal()
		if err != nil {
			t.Fatalf("%s: %v", r.Kind, err)
		}
		back, err := Unmarshal(b)
		if err != nil {
			t.Fatalf("%s: %v", r.Kind, err)
		}
		again, _ := back.Marshal()
		if !bytes.Equal(again, b) {
			t.Fatalf("%s: round trip changed bytes", r.Kind)
		}
	}
}

func TestRejects(t *testing.T) {
	good, _ := (&Record{Kind: KindTeardown, Time: 1, Teardown: &Teardown{Reason: "x"}}).Marshal()
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"non-canonical int", []byte{0xa3, 0x01, 0x18, 0x05, 0x02, 0x01, 0x07, 0xa1, 0x01, 0x61, 0x78}, "canonical"},
		{"unsorted keys", []byte{0xa3, 0x02, 0x01, 0x01, 0x05, 0x07, 0xa1, 0x01, 0x61, 0x78}, "canonical"},
		{"duplicate key", []byte{0xa3, 0x01, 0x05, 0x01, 0x05, 0x07, 0xa1, 0x01, 0x61, 0x78}, "duplicate"},
		{"unknown field", []byte{0xa4, 0x01, 0x05, 0x02, 0x01, 0x07, 0xa1, 0x01, 0x61, 0x78, 0x18, 0x63, 0x00}, "unknown field"},
		{"wrong body", []byte{0xa3, 0x01, 0x03, 0x02, 0x01, 0x07, 0xa1, 0x01, 0x61, 0x78}, "another kind"},
		{"two bodies", append(append([]byte{0xa4}, good[1:]...), 0x05, 0xa1, 0x01, 0x61, 0x78), "bodies"},
		{"truncated", good[:len(good)-1], "decode"},
		{"empty", nil, "decode"},
		{"oversize", make([]byte, MaxSize+1), "limit"},
		{"bad sha1 hash", mustMarshalRaw(&Record{Kind: KindMeasurement, Measurement: &Measurement{TemplateHashAlg: "sha1", TemplateHash: []byte{1}, Template: "ima-ng"}}), "sha1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Unmarshal(tt.in)
			if err == nil || !strings.Contains(err.Error(), tt.want) && !errors.Is(err, ErrNotCanonical) {
				t.Fatalf("Unmarshal = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

func mustMarshalRaw(r *Record) []byte {
	b, err := encMode.Marshal(r)
	if err != nil {
		panic(err)
	}
	return b
}

func FuzzUnmarshal(f *testing.F) {
	for _, r := range sample() {
		b, _ := r.Marshal()
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Unmarshal(b)
		if err != nil {
			return
		}
		again, err := r.Marshal()
		if err != nil {
			t.Fatalf("decoded record does not re-marshal: %v", err)
		}
		if !bytes.Equal(again, b) {
			t.Fatalf("accepted a non-canonical encoding")
		}
	})
}

func TestEpochRoundTrip(t *testing.T) {
	e := &Epoch{Host: "h", BridgeVersion: "v", PCR: 23, Time: 5, Nonce: [32]byte{1}}
	b, err := e.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := UnmarshalEpoch(b)
	if err != nil || *back != *e {
		t.Fatalf("epoch round trip: %v %+v", err, back)
	}
	if _, err := UnmarshalEpoch(append(b, 0)); err == nil {
		t.Fatal("accepted trailing byte")
	}
}

// TestTPMEventRoundTrip: a vTPM event survives the canonical encoding and
// converts back to the same event; malformed ones are refused.
func TestTPMEventRoundTrip(t *testing.T) {
	d1, d256 := make([]byte, 20), make([]byte, 32)
	d1[0], d256[0] = 1, 2
	e := vpcr.Event{Seq: 7, Kind: vpcr.KindExtend, Command: 0x182, Locality: 0, PCR: 10,
		Digests: []vpcr.Digest{{Alg: vpcr.SHA1, Value: d1}, {Alg: vpcr.SHA256, Value: d256}}}
	r := NewTPM(e, 5)
	b, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := back.TPM.Event()
	if err != nil || got.String() != e.String() {
		t.Fatalf("round trip: %v %v, want %v", got, err, e)
	}
	for name, bad := range map[string]func(*TPMEvent){
		"unknown kind":  func(t *TPMEvent) { t.Kind = 9 },
		"pcr 24":        func(t *TPMEvent) { t.PCR = 24 },
		"locality 5":    func(t *TPMEvent) { t.Locality = 5 },
		"short digest":  func(t *TPMEvent) { t.Digests[1].Digest = d256[:31] },
		"unknown bank":  func(t *TPMEvent) { t.Digests[0].Alg = 0x99 },
		"oversize data": func(t *TPMEvent) { t.Data = make([]byte, 1025) },
	} {
		r := NewTPM(e, 5)
		bad(r.TPM)
		if _, err := r.Marshal(); err == nil {
			t.Errorf("%s: marshalled", name)
		}
	}
}
