package conceal

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"testing"
)

type vectors struct {
	VMs []struct {
		UUID     string `json:"uuid"`
		Instance string `json:"instance"`
		Key      string `json:"key"`
		KTag     string `json:"k_tag"`
		KMAC     string `json:"k_mac"`
		ID       string `json:"id"`
		Records  []struct {
			S          uint64 `json:"s"`
			RecordHash string `json:"record_hash"`
			Tag        string `json:"tag"`
			Commit     string `json:"commit"`
			Leaf       string `json:"leaf"`
		} `json:"records"`
	} `json:"vms"`
	EpochRecord string `json:"epoch_record"`
	EpochLeaf   string `json:"epoch_leaf"`
	Batches     []struct {
		G0       uint64   `json:"g0"`
		Leaves   []string `json:"leaves"`
		Digest   string   `json:"digest"`
		PCRAfter string   `json:"pcr_after"`
	} `json:"batches"`
	Nonce        string `json:"nonce"`
	NonceDataVM0 string `json:"nonce_data_vm0"`
	FinalDataVM0 string `json:"final_data_vm0"`
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q: %v", s, err)
	}
	return b
}

func d32(t *testing.T, s string) Digest {
	var d Digest
	if b := mustHex(t, s); len(b) != 32 {
		t.Fatalf("%q is not 32 bytes", s)
	} else {
		copy(d[:], b)
	}
	return d
}

// TestKnownAnswers checks every construction against vectors computed by an
// independent implementation (scripts/gen-vectors.py).
func TestKnownAnswers(t *testing.T) {
	raw, err := os.ReadFile("../../testdata/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var v vectors
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatal(err)
	}
	if len(v.VMs) == 0 || len(v.Batches) == 0 {
		t.Fatal("vectors file holds no vectors")
	}
	for i, vm := range v.VMs {
		var uuid, inst [16]byte
		var key Key
		copy(uuid[:], mustHex(t, vm.UUID))
		copy(inst[:], mustHex(t, vm.Instance))
		copy(key[:], mustHex(t, vm.Key))
		id := ID(uuid, inst)
		if got := hex.EncodeToString(id[:]); got != vm.ID {
			t.Errorf("vm %d: id = %s, want %s", i, got, vm.ID)
		}
		if got := hex.EncodeToString(hmacOnce(key[:], []byte(LabelTag))); got != vm.KTag {
			t.Errorf("vm %d: K_tag = %s, want %s", i, got, vm.KTag)
		}
		if got := hex.EncodeToString(hmacOnce(key[:], []byte(LabelConceal))); got != vm.KMAC {
			t.Errorf("vm %d: K_mac = %s, want %s", i, got, vm.KMAC)
		}
		ks := Derive(key)
		for _, r := range vm.Records {
			tag := ks.Tag(r.S)
			c := ks.Commit(id, r.S, d32(t, r.RecordHash))
			if hex.EncodeToString(tag[:]) != r.Tag {
				t.Errorf("vm %d record %d: tag = %x, want %s", i, r.S, tag, r.Tag)
			}
			if hex.EncodeToString(c[:]) != r.Commit {
				t.Errorf("vm %d record %d: commit = %x, want %s", i, r.S, c, r.Commit)
			}
			if l := Leaf(tag, c); hex.EncodeToString(l[:]) != r.Leaf {
				t.Errorf("vm %d record %d: leaf = %x, want %s", i, r.S, l, r.Leaf)
			}
		}
	}
	if l := EpochLeaf(mustHex(t, v.EpochRecord)); hex.EncodeToString(l[:]) != v.EpochLeaf {
		t.Errorf("epoch leaf = %x, want %s", l, v.EpochLeaf)
	}
	var pcr Digest
	for i, b := range v.Batches {
		leaves := make([]Digest, len(b.Leaves))
		for j, l := range b.Leaves {
			leaves[j] = d32(t, l)
		}
		got := BatchDigest(b.G0, leaves)
		if hex.EncodeToString(got[:]) != b.Digest {
			t.Errorf("batch %d: digest = %x, want %s", i, got, b.Digest)
		}
		pcr = ExtendPCR(pcr, got)
		if hex.EncodeToString(pcr[:]) != b.PCRAfter {
			t.Errorf("batch %d: pcr = %x, want %s", i, pcr, b.PCRAfter)
		}
	}
	var uuid, inst [16]byte
	copy(uuid[:], mustHex(t, v.VMs[0].UUID))
	copy(inst[:], mustHex(t, v.VMs[0].Instance))
	id := ID(uuid, inst)
	if nd := NonceData(mustHex(t, v.Nonce), id); hex.EncodeToString(nd[:]) != v.NonceDataVM0 {
		t.Errorf("nonce data = %x, want %s", nd, v.NonceDataVM0)
	}
	last := v.VMs[0].Records[len(v.VMs[0].Records)-1]
	if fd := FinalData(id, d32(t, last.RecordHash)); hex.EncodeToString(fd[:]) != v.FinalDataVM0 {
		t.Errorf("final data = %x, want %s", fd, v.FinalDataVM0)
	}
}

func TestBatchHasherCount(t *testing.T) {
	bh := NewBatchHasher(0, 2)
	bh.Add(Digest{1})
	if _, ok := bh.Sum(); ok {
		t.Fatal("Sum reported ok with 1 of 2 leaves")
	}
}

// TestKeysReuse checks that the kept HMAC state gives the same answer on
// every call, in any order.
func TestKeysReuse(t *testing.T) {
	k := Derive(Key{7})
	a, b := k.Tag(1), k.Tag(2)
	if k.Tag(1) != a || k.Tag(2) != b || a == b {
		t.Fatal("tags are not a function of s")
	}
	id := Digest{3}
	c1 := k.Commit(id, 1, Digest{4})
	k.Tag(9)
	if k.Commit(id, 1, Digest{4}) != c1 {
		t.Fatal("commit changed after an interleaved tag")
	}
}

func TestIdentityJSON(t *testing.T) {
	id, err := NewIdentity([16]byte{0xde, 0xad})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(id)
	if err != nil {
		t.Fatal(err)
	}
	var back Identity
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back != *id {
		t.Fatalf("round trip changed identity: %+v vs %+v", back, *id)
	}
	bad := []string{
		`{"uuid":"zz","instance":"00","key":"00"}`,
		`{"uuid":"dead0000-0000-0000-0000-000000000000","instance":"0011","key":"00"}`,
		`{"uuid":"dead0000-0000-0000-0000-000000000000","instance":"00000000000000000000000000000000","key":"00","id":"00"}`,
	}
	for _, s := range bad {
		if err := json.Unmarshal([]byte(s), &back); err == nil {
			t.Errorf("accepted bad identity %s", s)
		}
	}
}

func TestParseUUID(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"6f1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a697", true},
		{"6f1c3a2e9b7d4c58a1e0f2d3c4b5a697", true},
		{"6f1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a69", false},
		{"6f1c3a2e9-b7d-4c58-a1e0-f2d3c4b5a697", false},
		{"gf1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a697", false},
	}
	for _, tt := range tests {
		u, err := ParseUUID(tt.in)
		if (err == nil) != tt.ok {
			t.Errorf("ParseUUID(%q) err = %v, want ok=%v", tt.in, err, tt.ok)
		}
		if err == nil && FormatUUID(u) != "6f1c3a2e-9b7d-4c58-a1e0-f2d3c4b5a697" {
			t.Errorf("FormatUUID = %s", FormatUUID(u))
		}
	}
}

func BenchmarkTagCommitLeaf(b *testing.B) {
	k := Derive(Key{1})
	id := Digest{2}
	rh := Digest{3}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		t := k.Tag(uint64(i))
		c := k.Commit(id, uint64(i), rh)
		_ = Leaf(t, c)
	}
}
