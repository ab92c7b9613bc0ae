package migrate

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/quote"
)

// SecretSize is the size of the fresh secret a handover wraps to the
// destination's TPM (the EK's name algorithm, SHA-256, bounds it).
const SecretSize = enroll.SecretSize

// Recipient is a destination host as the source knows it from its enrolled
// record: only that host's TPM (the EK the operator's EK CA certified,
// holding the AK of that name) can activate a credential made for it.
type Recipient struct {
	Host   string
	AK     *ecdsa.PublicKey
	AKFP   [32]byte // sha256 of the AK's PKIX DER (enroll.AKFingerprint)
	AKName []byte
	ekKind string
	ek     *tpm2.TPMTPublic
}

// RecipientFromRecord re-checks an enrolled record against the EK CA roots
// (enroll.Record.Check) and rebuilds the EK's public area from its
// certificate and the TCG default template of its kind, so a credential can
// be made to it.
func RecipientFromRecord(rec *enroll.Record, roots *x509.CertPool, now time.Time) (*Recipient, error) {
	ak, err := rec.Check(roots, now)
	if err != nil {
		return nil, fmt.Errorf("enrolled record of %q: %w", rec.Host, err)
	}
	_, certKey, err := enroll.ParseEKCert([]byte(rec.EKCert))
	if err != nil {
		return nil, fmt.Errorf("enrolled record of %q: %w", rec.Host, err)
	}
	ek, err := ekPublic(rec.EKKind, certKey)
	if err != nil {
		return nil, fmt.Errorf("enrolled record of %q: %w", rec.Host, err)
	}
	return &Recipient{Host: rec.Host, AK: ak, AKFP: quote.AKFingerprint(ak), AKName: append([]byte(nil), rec.AKName...), ekKind: rec.EKKind, ek: ek}, nil
}

// EKKind is the kind of the recipient's EK ("rsa" or "ecc"), which its TPM
// needs to activate.
func (r *Recipient) EKKind() string { return r.ekKind }

// ekPublic is the TCG default EK template of kind with the certificate's
// key as its unique field.
func ekPublic(kind string, key any) (*tpm2.TPMTPublic, error) {
	switch kind {
	case "rsa":
		k, ok := key.(*rsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("EK kind rsa but the EK certificate's key is %T", key)
		}
		t := tpm2.RSAEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, (k.N.BitLen()+7)/8))})
		return &t, nil
	case "ecc":
		k, ok := key.(*ecdsa.PublicKey)
		if !ok {
			return nil, fmt.Errorf("EK kind ecc but the EK certificate's key is %T", key)
		}
		x, y, err := ecPoint(k)
		if err != nil {
			return nil, err
		}
		t := tpm2.ECCEKTemplate
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: x}, Y: tpm2.TPM2BECCParameter{Buffer: y}})
		return &t, nil
	}
	return nil, fmt.Errorf("unknown EK kind %q (want rsa or ecc)", kind)
}

func ecPoint(k *ecdsa.PublicKey) (x, y []byte, err error) {
	b, err := k.Bytes() // uncompressed 0x04 || X || Y
	if err != nil {
		return nil, nil, fmt.Errorf("EK public key: %w", err)
	}
	n := (len(b) - 1) / 2
	return b[1 : 1+n], b[1+n:], nil
}

// Credential is a fresh secret wrapped to a recipient's TPM
// (TPM2_MakeCredential in software, to its EK and for its AK's name).
type Credential struct {
	EKKind          string `json:"ek_kind"`          // the recipient's EK: rsa or ecc
	Blob            []byte `json:"blob"`             // TPM2B_ID_OBJECT contents
	EncryptedSecret []byte `json:"encrypted_secret"` // TPM2B_ENCRYPTED_SECRET contents
}

// Digest is sha256(blob || encrypted secret): what the migrated-out record
// names, so the record commits to the one credential that carried K.
func (c *Credential) Digest() [32]byte {
	h := sha256.New()
	h.Write(c.Blob)
	h.Write(c.EncryptedSecret)
	var d [32]byte
	h.Sum(d[:0])
	return d
}

// MakeCredential draws a fresh secret and wraps it to r. The secret stays
// with the caller: it keys Seal and must be forgotten afterwards.
func MakeCredential(r *Recipient, rnd io.Reader) (*Credential, []byte, error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	kem, err := tpm2.ImportEncapsulationKey(r.ek)
	if err != nil {
		return nil, nil, fmt.Errorf("EK of %q as encryption key: %w", r.Host, err)
	}
	secret := make([]byte, SecretSize)
	if _, err := io.ReadFull(rnd, secret); err != nil {
		return nil, nil, fmt.Errorf("draw handover secret: %w", err)
	}
	blob, enc, err := tpm2.CreateCredential(rnd, kem, r.AKName, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("make credential for %q: %w", r.Host, err)
	}
	return &Credential{EKKind: r.ekKind, Blob: blob, EncryptedSecret: enc}, secret, nil
}

// Binding is what a sealed identity is bound to (the AEAD's additional
// data): a sealed box opens only for this VM, this handover (the
// destination's nonce), these two hosts and this credential.
type Binding struct {
	UUID       [16]byte
	Nonce      [32]byte
	SourceHost string
	DestHost   string
	DestAK     [32]byte
	Credential [32]byte
}

// aad is the canonical encoding of b: a label, then every field
// length-prefixed.
func (b *Binding) aad() []byte {
	out := []byte("tpmmux/v1/migrate-identity")
	for _, f := range [][]byte{b.UUID[:], b.Nonce[:], []byte(b.SourceHost), []byte(b.DestHost), b.DestAK[:], b.Credential[:]} {
		out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
		out = append(out, f...)
	}
	return out
}

func aeadFor(secret []byte) (cipher.AEAD, error) {
	if len(secret) != SecretSize {
		return nil, fmt.Errorf("handover secret of %d bytes, want %d", len(secret), SecretSize)
	}
	key, err := hkdf.Key(sha256.New, secret, nil, "tpmmux/v1/migrate-aead", 32)
	if err != nil {
		return nil, err
	}
	blk, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(blk)
}

// Seal encrypts plaintext under secret with AES-256-GCM (key derived by
// HKDF-SHA256), bound to b. The output is nonce || ciphertext.
func Seal(secret, plaintext []byte, b *Binding) ([]byte, error) {
	a, err := aeadFor(secret)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, a.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return a.Seal(nonce, nonce, plaintext, b.aad()), nil
}

// ErrSealed says a sealed identity did not open: altered, replayed into
// another handover, or wrapped for another host.
var ErrSealed = errors.New("the sealed identity does not open with this handover's secret and binding (altered, or made for another VM, nonce, host or credential)")

// Open decrypts what Seal made, checking the binding.
func Open(secret, sealed []byte, b *Binding) ([]byte, error) {
	a, err := aeadFor(secret)
	if err != nil {
		return nil, err
	}
	if len(sealed) < a.NonceSize()+a.Overhead() {
		return nil, ErrSealed
	}
	out, err := a.Open(nil, sealed[:a.NonceSize()], sealed[a.NonceSize():], b.aad())
	if err != nil {
		return nil, ErrSealed
	}
	return out, nil
}
