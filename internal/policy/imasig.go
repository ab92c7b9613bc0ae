package policy

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
)

// Key is a key IMA signatures are checked with, under its key id: the
// last 4 bytes of its X.509 subject key identifier (what the kernel and
// evmctl put in signature_v2_hdr.keyid), or for a bare key the last 4
// bytes of SHA-1 over its PKCS #1 DER (RSA) or uncompressed point (ECDSA).
type Key struct {
	ID  uint32
	Pub crypto.PublicKey
}

// The results of an IMA signature check (verify.SignatureEntry.Status).
const (
	StatusVerified  = "verified"
	StatusNoKey     = "no-key"
	StatusBad       = "bad-signature"
	StatusMismatch  = "mismatch"
	StatusMalformed = "malformed"
)

// Signature v2 header (security/integrity/integrity.h, signature_v2_hdr):
// type, version, hash_algo, keyid (be32), sig_size (be16), then the
// signature.
const sigHeaderLen = 9

// The signature types of IMA's xattr (evm_ima_xattr_type).
const (
	evmIMAXattrDigsig       = 3
	evmXattrPortableDigsig  = 5
	signatureVersion2       = 2
	maxVerificationKeysSize = 4 << 20
)

// hashAlgo maps the kernel's hash_algo ids (include/uapi/linux/hash_info.h)
// to a hash and the kernel's name for it.
func hashAlgo(id byte) (crypto.Hash, string, bool) {
	switch id {
	case 2:
		return crypto.SHA1, "sha1", true
	case 4:
		return crypto.SHA256, "sha256", true
	case 5:
		return crypto.SHA384, "sha384", true
	case 6:
		return crypto.SHA512, "sha512", true
	case 7:
		return crypto.SHA224, "sha224", true
	}
	return 0, fmt.Sprintf("hash_algo %d", id), false
}

// verifySignature checks an IMA signature (signature_v2_hdr) over a file
// digest of algorithm digestAlg, as the kernel's asymmetric_verify and
// Keylime's _asymmetric_verify do: RSA PKCS #1 v1.5 or ECDSA over the
// digest itself, with the key of the header's key id.
func verifySignature(sig, digest []byte, digestAlg string, lookup func(uint32) (Key, bool)) (status string, keyID *uint32, hashName string) {
	if len(sig) < sigHeaderLen {
		return StatusMalformed, nil, ""
	}
	if (sig[0] != evmIMAXattrDigsig && sig[0] != evmXattrPortableDigsig) || sig[1] != signatureVersion2 {
		return StatusMalformed, nil, ""
	}
	id := binary.BigEndian.Uint32(sig[3:7])
	size := int(binary.BigEndian.Uint16(sig[7:9]))
	h, name, ok := hashAlgo(sig[2])
	if size != len(sig)-sigHeaderLen {
		return StatusMalformed, &id, name
	}
	if !ok {
		return StatusMalformed, &id, name
	}
	if name != digestAlg || len(digest) != h.Size() {
		return StatusMismatch, &id, name
	}
	k, ok := lookup(id)
	if !ok {
		return StatusNoKey, &id, name
	}
	body := sig[sigHeaderLen:]
	switch pub := k.Pub.(type) {
	case *rsa.PublicKey:
		if rsa.VerifyPKCS1v15(pub, h, digest, body) == nil {
			return StatusVerified, &id, name
		}
	case *ecdsa.PublicKey:
		if ecdsa.VerifyASN1(pub, digest, body) {
			return StatusVerified, &id, name
		}
	}
	return StatusBad, &id, name
}

// KeyIDv2 computes the key id of a bare key: the last 4 bytes of SHA-1
// over its PKCS #1 DER (RSA) or its uncompressed point (ECDSA), as Keylime
// and evmctl do for keys without a certificate.
func KeyIDv2(pub crypto.PublicKey) (uint32, error) {
	var b []byte
	switch k := pub.(type) {
	case *rsa.PublicKey:
		b = x509.MarshalPKCS1PublicKey(k)
	case *ecdsa.PublicKey:
		e, err := k.ECDH()
		if err != nil {
			return 0, err
		}
		b = e.Bytes()
	case *ecdh.PublicKey:
		b = k.Bytes()
	default:
		return 0, fmt.Errorf("unsupported key type %T (want RSA or ECDSA)", pub)
	}
	sum := sha1.Sum(b)
	return binary.BigEndian.Uint32(sum[16:]), nil
}

// keyOfCert is a certificate's key under the id of its subject key
// identifier (else the computed one).
func keyOfCert(c *x509.Certificate) (Key, error) {
	switch c.PublicKey.(type) {
	case *rsa.PublicKey, *ecdsa.PublicKey:
	default:
		return Key{}, fmt.Errorf("certificate %q: unsupported key type %T (want RSA or ECDSA)", c.Subject.String(), c.PublicKey)
	}
	if len(c.SubjectKeyId) >= 4 {
		return Key{ID: binary.BigEndian.Uint32(c.SubjectKeyId[len(c.SubjectKeyId)-4:]), Pub: c.PublicKey}, nil
	}
	id, err := KeyIDv2(c.PublicKey)
	return Key{ID: id, Pub: c.PublicKey}, err
}

func keyOfPub(pub crypto.PublicKey) (Key, error) {
	id, err := KeyIDv2(pub)
	return Key{ID: id, Pub: pub}, err
}

// keyFromBuffer reads a key the way Keylime's get_pubkey does: a DER or
// PEM certificate, public key, or private key. A buffer that is none of
// these is not a key (isKey false); a key of an unsupported type is an
// error.
func keyFromBuffer(b []byte) (Key, bool, error) {
	try := func(der []byte) (Key, bool, error) {
		if c, err := x509.ParseCertificate(der); err == nil {
			k, err := keyOfCert(c)
			return k, true, err
		}
		if p, err := x509.ParsePKIXPublicKey(der); err == nil {
			k, err := keyOfPub(p)
			return k, true, err
		}
		for _, parse := range []func([]byte) (any, error){
			x509.ParsePKCS8PrivateKey,
			func(d []byte) (any, error) { return x509.ParseECPrivateKey(d) },
			func(d []byte) (any, error) { return x509.ParsePKCS1PrivateKey(d) },
		} {
			if priv, err := parse(der); err == nil {
				s, ok := priv.(crypto.Signer)
				if !ok {
					return Key{}, true, fmt.Errorf("unsupported private key type %T", priv)
				}
				k, err := keyOfPub(s.Public())
				return k, true, err
			}
		}
		return Key{}, false, nil
	}
	if k, ok, err := try(b); ok || err != nil {
		return k, ok, err
	}
	if blk, _ := pem.Decode(b); blk != nil {
		return try(blk.Bytes)
	}
	return Key{}, false, nil
}

// ParseKeys reads IMA verification keys: one or more PEM certificates or
// public keys, or a single DER certificate or public key (what --ima-keys
// takes; the kernel loads such certificates onto its .ima keyring).
func ParseKeys(b []byte) ([]Key, error) {
	var out []Key
	rest := b
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		var k Key
		var err error
		switch blk.Type {
		case "CERTIFICATE":
			var c *x509.Certificate
			if c, err = x509.ParseCertificate(blk.Bytes); err == nil {
				k, err = keyOfCert(c)
			}
		case "PUBLIC KEY":
			var p any
			if p, err = x509.ParsePKIXPublicKey(blk.Bytes); err == nil {
				k, err = keyOfPub(p)
			}
		default:
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	if len(out) > 0 {
		return out, nil
	}
	k, ok, err := keyFromBuffer(b)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errors.New("no certificate or public key (PEM or DER)")
	}
	return []Key{k}, nil
}

// ReadKeyFile reads ParseKeys' input from a file.
func ReadKeyFile(path string) ([]Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ks, err := ParseKeys(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ks, nil
}

// keyringJSON is Keylime's serialized ImaKeyring (verification-keys).
type keyringJSON struct {
	Meta    *struct{ Version int } `json:"meta,omitempty"`
	KeyIDs  []int64                `json:"keyids"`
	PubKeys []string               `json:"pubkeys"`
}

// parseVerificationKeys reads the policy's verification-keys: "" for none,
// or a string (as Keylime writes it) or object holding a keyring.
func parseVerificationKeys(raw json.RawMessage) ([]Key, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, nil
	}
	if len(raw) > maxVerificationKeysSize {
		return nil, fmt.Errorf("%d bytes", len(raw))
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		if s == "" {
			return nil, nil
		}
		raw = []byte(s)
		// Keylime's database form is a string holding a string.
		if len(raw) > 0 && raw[0] == '"' {
			if err := json.Unmarshal(raw, &s); err != nil {
				return nil, err
			}
			raw = []byte(s)
		}
	}
	var kr keyringJSON
	if err := json.Unmarshal(raw, &kr); err != nil {
		return nil, fmt.Errorf("want a keyring {\"keyids\": [...], \"pubkeys\": [...]}: %w", err)
	}
	var out []Key
	for i, p := range kr.PubKeys {
		der, err := base64.StdEncoding.DecodeString(p)
		if err != nil {
			return nil, fmt.Errorf("pubkeys[%d]: %w", i, err)
		}
		pub, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			return nil, fmt.Errorf("pubkeys[%d]: %w", i, err)
		}
		k, err := keyOfPub(pub)
		if err != nil {
			return nil, fmt.Errorf("pubkeys[%d]: %w", i, err)
		}
		if i < len(kr.KeyIDs) {
			if kr.KeyIDs[i] < 0 || kr.KeyIDs[i] > 0xffffffff {
				return nil, fmt.Errorf("keyids[%d] = %d is not a 32-bit key id", i, kr.KeyIDs[i])
			}
			k.ID = uint32(kr.KeyIDs[i])
		}
		out = append(out, k)
	}
	return out, nil
}
