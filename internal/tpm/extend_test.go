package tpm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// recorder is a go-tpm transport that records the command and answers with
// a canned successful TPM2_PCR_Extend response.
type recorder struct{ cmd []byte }

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.cmd = bytes.Clone(cmd)
	// tag, size 19, rc 0, parameterSize 0, auth: nonce 0, attrs
	// continueSession, hmac 0.
	return []byte{0x80, 0x02, 0, 0, 0, 19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0}, nil
}

func TestBuildExtendMatchesGoTPM(t *testing.T) {
	tests := []struct {
		pcr int
		d   [32]byte
	}{
		{0, [32]byte{}},
		{10, digest("ten")},
		{23, digest("batch")},
		{23, [32]byte{0: 0xff, 31: 0xff}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(tc.pcr), func(t *testing.T) {
			var r recorder
			if _, err := goTPMExtend(tc.pcr, tc.d).Execute(&r); err != nil {
				t.Fatal(err)
			}
			var buf [extendCmdLen]byte
			buildExtend(&buf, tc.pcr, &tc.d)
			if !bytes.Equal(buf[:], r.cmd) {
				t.Errorf("hand-built command\n%x\ngo-tpm command\n%x", buf, r.cmd)
			}
		})
	}
}

func TestParseExtendResponse(t *testing.T) {
	ok := []byte{0x80, 0x02, 0, 0, 0, 19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0}
	rcLocality := binary.BigEndian.AppendUint32([]byte{0x80, 0x01, 0, 0, 0, 10}, uint32(tpm2.TPMRCLocality))
	tests := []struct {
		name   string
		rsp    []byte
		wantRC error
		ok     bool
	}{
		{"success", ok, nil, true},
		{"short", ok[:9], nil, false},
		{"size mismatch", ok[:18], nil, false},
		{"locality error", rcLocality, tpm2.TPMRCLocality, false},
		{"success without sessions tag", append([]byte{0x80, 0x01}, ok[2:]...), nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := parseExtendResponse(tc.rsp)
			if (err == nil) != tc.ok {
				t.Fatalf("parseExtendResponse = %v, want ok=%v", err, tc.ok)
			}
			if tc.wantRC != nil && !errors.Is(err, tc.wantRC) {
				t.Errorf("error %v is not %v", err, tc.wantRC)
			}
		})
	}
}

// TestFastAndGoTPMExtendAgree extends one PCR through each path on the real
// simulator and checks both give the same value.
func TestFastAndGoTPMExtendAgree(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			tp := b.open(t)
			d := tpmDev(tp)
			ctx := t.Context()
			v, err := tp.ReadPCRs(ctx, []int{15, 16})
			if err != nil {
				t.Fatal(err)
			}
			if v[0] != v[1] {
				t.Fatalf("PCRs 15 and 16 start different: %x %x", v[0], v[1])
			}
			for _, s := range []string{"a", "b", "c"} {
				if err := tp.Extend(ctx, 15, digest(s)); err != nil {
					t.Fatal(err)
				}
				if err := d.extendGoTPM(ctx, 16, digest(s)); err != nil {
					t.Fatal(err)
				}
			}
			v, err = tp.ReadPCRs(ctx, []int{15, 16})
			if err != nil {
				t.Fatal(err)
			}
			if v[0] != v[1] {
				t.Errorf("hand-built extend gave %x, go-tpm gave %x", v[0], v[1])
			}
		})
	}
}

// TestExtendLocalityError checks that a TPM error code from the fast path
// arrives as a matchable tpm2.TPMRC: PCR 17 (DRTM) refuses locality 0.
func TestExtendLocalityError(t *testing.T) {
	tp := openT(t, "sim")
	err := tp.Extend(t.Context(), 17, digest("x"))
	if !errors.Is(err, tpm2.TPMRCLocality) {
		t.Errorf("Extend(17) = %v, want TPM_RC_LOCALITY", err)
	}
	// The TPM is still usable afterwards.
	if err := tp.Extend(t.Context(), 23, digest("x")); err != nil {
		t.Fatal(err)
	}
}

func tpmDev(tp TPM) *dev {
	switch v := tp.(type) {
	case *dev:
		return v
	case *simTPM:
		return v.dev
	}
	panic(fmt.Sprintf("unexpected TPM type %T", tp))
}

// BenchmarkExtend compares the hand-built TPM2_PCR_Extend with go-tpm's
// reflection-marshalled one on each backend.
func BenchmarkExtend(b *testing.B) {
	for _, be := range backends() {
		b.Run(be.name, func(b *testing.B) {
			tp := be.open(b)
			d := tpmDev(tp)
			ctx := b.Context()
			dg := digest("bench")
			b.Run("hand-built", func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if err := tp.Extend(ctx, 23, dg); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("go-tpm", func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if err := d.extendGoTPM(ctx, 23, dg); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkQuote measures one quote over the default evidence PCRs
// (0-7, 10, 23) with a 32-byte extraData.
func BenchmarkQuote(b *testing.B) {
	for _, be := range backends() {
		b.Run(be.name, func(b *testing.B) {
			tp := be.open(b)
			ctx := b.Context()
			nonce := digest("nonce")
			b.ReportAllocs()
			for b.Loop() {
				if _, err := tp.Quote(ctx, quotePCRs, nonce[:]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkReadPCRs measures reading all 24 sha256 PCRs (three commands).
func BenchmarkReadPCRs(b *testing.B) {
	all := make([]int, NumPCRs)
	for i := range all {
		all[i] = i
	}
	for _, be := range backends() {
		b.Run(be.name, func(b *testing.B) {
			tp := be.open(b)
			ctx := b.Context()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := tp.ReadPCRs(ctx, all); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
