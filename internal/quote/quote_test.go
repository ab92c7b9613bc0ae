package quote

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"slices"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// realQuote is a quote produced by the simulator (testdata/sim_quote.json,
// written by internal/tpm's TestWriteQuoteTestdata).
type realQuote struct {
	ak        *ecdsa.PublicKey
	attest    []byte
	sig       []byte
	nonce     []byte
	pcrs      []int
	values    [][32]byte
	signature tpm2.TPMTSignature
}

func loadReal(t testing.TB) realQuote {
	t.Helper()
	b, err := os.ReadFile("testdata/sim_quote.json")
	if err != nil {
		t.Fatal(err)
	}
	var j struct {
		AKPEM     string   `json:"ak_pem"`
		Attest    string   `json:"attest"`
		Signature string   `json:"signature"`
		Nonce     string   `json:"nonce"`
		PCRs      []int    `json:"pcrs"`
		Values    []string `json:"values"`
	}
	if err := json.Unmarshal(b, &j); err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(j.AKPEM))
	if blk == nil {
		t.Fatal("no PEM block")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	q := realQuote{ak: k.(*ecdsa.PublicKey), attest: unhex(t, j.Attest), sig: unhex(t, j.Signature), nonce: unhex(t, j.Nonce), pcrs: j.PCRs}
	for _, v := range j.Values {
		q.values = append(q.values, [32]byte(unhex(t, v)))
	}
	s, err := tpm2.Unmarshal[tpm2.TPMTSignature](q.sig)
	if err != nil {
		t.Fatal(err)
	}
	q.signature = *s
	return q
}

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRealQuote(t *testing.T) {
	q := loadReal(t)
	info, err := Check(q.attest, q.sig, q.ak)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(info.ExtraData, q.nonce) {
		t.Errorf("ExtraData = %x, want %x", info.ExtraData, q.nonce)
	}
	if !slices.Equal(info.PCRs, q.pcrs) {
		t.Errorf("PCRs = %v, want %v", info.PCRs, q.pcrs)
	}
	if want := PCRDigest(q.values); !bytes.Equal(info.PCRDigest, want) {
		t.Errorf("PCRDigest = %x, want %x", info.PCRDigest, want)
	}
	if len(info.QualifiedSigner) != 34 {
		t.Errorf("QualifiedSigner is %d bytes, want 34 (sha256 name)", len(info.QualifiedSigner))
	}
	if !info.Safe {
		t.Error("Safe = false on a fresh simulator")
	}
}

// derSig converts a TPMT_SIGNATURE to DER, as tpm2_quote -f plain writes.
func derSig(t testing.TB, s tpm2.TPMTSignature) []byte {
	t.Helper()
	e, err := s.Signature.ECDSA()
	if err != nil {
		t.Fatal(err)
	}
	r, ss := new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)
	// ecdsa has no exported DER encoder for (r, s); build the SEQUENCE.
	enc := func(n *big.Int) []byte {
		b := n.Bytes()
		if len(b) == 0 || b[0]&0x80 != 0 {
			b = append([]byte{0}, b...)
		}
		return append([]byte{0x02, byte(len(b))}, b...)
	}
	body := append(enc(r), enc(ss)...)
	return append([]byte{0x30, byte(len(body))}, body...)
}

func TestSignatureForms(t *testing.T) {
	q := loadReal(t)
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	e, _ := q.signature.Signature.ECDSA()
	withHash := func(h tpm2.TPMIAlgHash) []byte {
		return tpm2.Marshal(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA,
			&tpm2.TPMSSignatureECC{Hash: h, SignatureR: e.SignatureR, SignatureS: e.SignatureS})})
	}
	rsaSig := tpm2.Marshal(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgRSASSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgRSASSA,
		&tpm2.TPMSSignatureRSA{Hash: tpm2.TPMAlgSHA256, Sig: tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}})})
	tests := []struct {
		name string
		sig  []byte
		ak   *ecdsa.PublicKey
		want error // nil: success
	}{
		{"TPMT_SIGNATURE", q.sig, q.ak, nil},
		{"DER", derSig(t, q.signature), q.ak, nil},
		{"other key", q.sig, &other.PublicKey, ErrSignature},
		{"other key DER", derSig(t, q.signature), &other.PublicKey, ErrSignature},
		{"nil key", q.sig, nil, ErrKey},
		{"P-384 key", q.sig, &p384.PublicKey, ErrKey},
		{"empty", nil, q.ak, ErrMalformedSignature},
		{"one byte", []byte{0x00}, q.ak, ErrMalformedSignature},
		{"truncated", q.sig[:len(q.sig)-1], q.ak, ErrMalformedSignature},
		{"trailing byte", append(bytes.Clone(q.sig), 0), q.ak, ErrMalformedSignature},
		{"sha1 hash", withHash(tpm2.TPMAlgSHA1), q.ak, ErrMalformedSignature},
		{"rsassa", rsaSig, q.ak, ErrMalformedSignature},
		{"null alg", []byte{0x00, 0x10}, q.ak, ErrMalformedSignature},
		{"bad DER", []byte{0x30, 0x03, 0x02, 0x01}, q.ak, ErrSignature},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Check(q.attest, tc.sig, tc.ak)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Check = %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Check = %v, want %v", err, tc.want)
			}
		})
	}
}

// signed signs attest with a software key, so attest bytes can be varied
// while the signature stays valid and the parser is what gets tested.
func signed(t testing.TB, k *ecdsa.PrivateKey, attest []byte) []byte {
	t.Helper()
	d := sha256.Sum256(attest)
	r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA,
		&tpm2.TPMSSignatureECC{Hash: tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r.FillBytes(make([]byte, 32))},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s.FillBytes(make([]byte, 32))}})})
}

// attestWith marshals a quote TPMS_ATTEST with the given selection.
func attestWith(sel tpm2.TPMLPCRSelection, digest []byte) []byte {
	return tpm2.Marshal(tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            tpm2.TPMSTAttestQuote,
		QualifiedSigner: tpm2.TPM2BName{Buffer: []byte{0, 0x0b, 1, 2}},
		ExtraData:       tpm2.TPM2BData{Buffer: []byte("nonce")},
		ClockInfo:       tpm2.TPMSClockInfo{Clock: 1234, ResetCount: 2, RestartCount: 3, Safe: true},
		FirmwareVersion: 0x0102030405060708,
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
			PCRSelect: sel,
			PCRDigest: tpm2.TPM2BDigest{Buffer: digest},
		}),
	})
}

func sel(banks ...tpm2.TPMSPCRSelection) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: banks}
}

func TestAttestParsing(t *testing.T) {
	q := loadReal(t)
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(q.attest)) }
	sha256Sel := tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0x01, 0x04, 0x80}}
	dg := bytes.Repeat([]byte{7}, 32)
	tests := []struct {
		name     string
		attest   []byte
		want     error // nil: success
		wantPCRs []int
	}{
		{"real re-signed", q.attest, nil, q.pcrs},
		{"crafted", attestWith(sel(sha256Sel), dg), nil, []int{0, 10, 23}},
		{"empty selection", attestWith(sel(), dg), nil, nil},
		{"sha256 bank with no PCRs", attestWith(sel(tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA256, PCRSelect: []byte{0, 0, 0}}), dg), nil, nil},
		{"sha1 bank", attestWith(sel(tpm2.TPMSPCRSelection{Hash: tpm2.TPMAlgSHA1, PCRSelect: []byte{1, 0, 0}}), dg), ErrMalformed, nil},
		{"two banks", attestWith(sel(sha256Sel, sha256Sel), dg), ErrMalformed, nil},
		{"wrong magic", mut(func(b []byte) []byte { b[0] = 0; return b }), ErrMagic, nil},
		{"certify type", mut(func(b []byte) []byte { b[5] = 0x17; return b }), ErrType, nil},
		{"trailing byte", append(bytes.Clone(q.attest), 0), ErrMalformed, nil},
		{"truncated", q.attest[:len(q.attest)-1], ErrMalformed, nil},
		{"header only", q.attest[:6], ErrMalformed, nil},
		{"short", q.attest[:3], ErrMalformed, nil},
		{"empty", nil, ErrMalformed, nil},
		{"huge list count", mut(func(b []byte) []byte {
			// The TPML_PCR_SELECTION count sits 44 bytes from the end.
			binary.BigEndian.PutUint32(b[len(b)-44:], 0xffffffff)
			return b
		}), ErrMalformed, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			info, err := Check(tc.attest, signed(t, k, tc.attest), &k.PublicKey)
			if tc.want != nil {
				if !errors.Is(err, tc.want) {
					t.Fatalf("Check = %v, want %v", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Check = %v", err)
			}
			if !slices.Equal(info.PCRs, tc.wantPCRs) {
				t.Errorf("PCRs = %v, want %v", info.PCRs, tc.wantPCRs)
			}
		})
	}

	t.Run("fields", func(t *testing.T) {
		a := attestWith(sel(sha256Sel), dg)
		info, err := Check(a, signed(t, k, a), &k.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		want := Info{ExtraData: []byte("nonce"), PCRs: []int{0, 10, 23}, PCRDigest: dg, Clock: 1234, ResetCount: 2,
			RestartCount: 3, Safe: true, FirmwareVersion: 0x0102030405060708, QualifiedSigner: []byte{0, 0x0b, 1, 2}}
		got, _ := json.Marshal(info)
		w, _ := json.Marshal(want)
		if !bytes.Equal(got, w) {
			t.Errorf("Info = %s\nwant   %s", got, w)
		}
	})
}

func TestErrorMessages(t *testing.T) {
	q := loadReal(t)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	bad := bytes.Clone(q.attest)
	bad[0] = 0
	_, err := Check(bad, signed(t, k, bad), &k.PublicKey)
	if want := "quote magic 0x00544347"; err == nil || !bytes.Contains([]byte(err.Error()), []byte(want)) {
		t.Errorf("error %q lacks %q", err, want)
	}
	_, err = Check(q.attest, q.sig, &k.PublicKey)
	if want := "quote signature does not verify with the given AK"; err == nil || err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
}

func TestPCRDigest(t *testing.T) {
	empty := sha256.Sum256(nil)
	if got := PCRDigest(nil); !bytes.Equal(got, empty[:]) {
		t.Errorf("PCRDigest(nil) = %x", got)
	}
	a, b := [32]byte{1}, [32]byte{2}
	want := sha256.Sum256(append(a[:], b[:]...))
	if got := PCRDigest([][32]byte{a, b}); !bytes.Equal(got, want[:]) {
		t.Errorf("PCRDigest(a, b) = %x, want %x", got, want)
	}
}

// FuzzCheck feeds Check arbitrary attest and signature bytes. Each input is
// tried twice: with the fuzzed signature against the real AK (exercising the
// signature parser), and re-signed with a software key (so the attest parser
// is reached). Check must never panic, and anything it accepts must be a
// quote.
func FuzzCheck(f *testing.F) {
	q := loadReal(f)
	f.Add(q.attest, q.sig)
	f.Add(q.attest, derSig(f, q.signature))
	f.Add(attestWith(sel(), nil), []byte{0x00, 0x18})
	f.Add([]byte{}, []byte{})
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, attest, sig []byte) {
		for _, c := range []struct {
			sig []byte
			ak  *ecdsa.PublicKey
		}{{sig, q.ak}, {signed(t, k, attest), &k.PublicKey}} {
			info, err := Check(attest, c.sig, c.ak)
			if errors.Is(err, errPanic) {
				t.Fatalf("Check panicked: %v", err)
			}
			if err == nil && (len(attest) < 6 || binary.BigEndian.Uint32(attest) != generatedValue || info == nil) {
				t.Fatalf("Check accepted %x", attest)
			}
		}
	})
}
