// Package enroll is the verifier's side of AK enrollment by credential
// activation (TPM2_MakeCredential / TPM2_ActivateCredential): instead of
// trusting a host's word for which key is its TPM's attestation key, a
// verifier checks that the host's EK certificate chains to an EK CA it
// trusts, that the AK has the attributes of a TPM-resident restricted
// signing key, and then proves that the AK sits in the TPM that holds the
// certified EK: it encrypts a fresh secret to the EK, bound to the AK's
// name, which only that TPM can decrypt, and only while that AK is loaded.
//
// Because the tenant is remote, the exchange is four files:
//
//	host      tpmmux-bridge enroll-request --out req.json        → Request
//	verifier  tpmmux-verify enroll challenge --request req.json  → Challenge (+ State, kept)
//	host      tpmmux-bridge enroll-answer --challenge chal.json  → Answer
//	verifier  tpmmux-verify enroll finish --answer ans.json      → Record (the enrolled AK)
//
// The package is pure: no TPM, no network. It is shared by the bridge
// (message types) and the verifier.
package enroll

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
)

// Version is the version of the enrollment files.
const Version = 1

// MaxFile bounds an enrollment file (an EK certificate is 1 to 2 KiB).
const MaxFile = 1 << 20

// Hex is a byte string written as lower-case hex in JSON.
type Hex []byte

// MarshalJSON writes the bytes as a hex string.
func (h Hex) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(h)) }

// UnmarshalJSON reads a hex string.
func (h *Hex) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a hex string: %w", err)
	}
	v, err := hex.DecodeString(s)
	if err != nil {
		return fmt.Errorf("want a hex string: %w", err)
	}
	*h = v
	return nil
}

// Request is the host's half (tpmmux-bridge enroll-request): its EK
// certificate, EK and AK public areas. Nothing in it is trusted until the
// verifier has checked it.
type Request struct {
	Version int    `json:"version"`
	Host    string `json:"host,omitempty"` // informational
	// EKKind is "rsa" (TCG template L-1) or "ecc" (L-2).
	EKKind string `json:"ek_kind"`
	// EKCertIndex is the NV index the certificate was read from,
	// informational ("0x01c00002").
	EKCertIndex string `json:"ek_cert_nv_index,omitempty"`
	// EKCert is the EK certificate, PEM.
	EKCert string `json:"ek_cert"`
	// EKPublic and AKPublic are marshalled TPMT_PUBLIC structures.
	EKPublic Hex       `json:"ek_public"`
	AKPublic Hex       `json:"ak_public"`
	Created  time.Time `json:"created,omitzero"`
}

// Challenge is the verifier's credential for the host
// (tpmmux-verify enroll challenge): a secret encrypted to the certified
// EK, bound to the AK's name.
type Challenge struct {
	Version int `json:"version"`
	// Request is the digest of the request it answers (RequestDigest).
	Request Hex    `json:"request_sha256"`
	EKKind  string `json:"ek_kind"`
	// AKName is the name of the AK the credential is for (informational
	// for the host: the TPM checks it).
	AKName Hex `json:"ak_name"`
	// CredentialBlob (TPM2B_ID_OBJECT contents) and EncryptedSecret
	// (TPM2B_ENCRYPTED_SECRET contents) are TPM2_MakeCredential's output.
	CredentialBlob  Hex       `json:"credential_blob"`
	EncryptedSecret Hex       `json:"encrypted_secret"`
	Expires         time.Time `json:"expires,omitzero"`
}

// Answer is the host's reply (tpmmux-bridge enroll-answer): the secret its
// TPM released.
type Answer struct {
	Version int `json:"version"`
	Request Hex `json:"request_sha256"`
	Secret  Hex `json:"secret"`
}

// State is what the verifier keeps between challenge and finish. It holds
// the secret: keep it private (mode 0600), never send it.
type State struct {
	Version      int       `json:"version"`
	Request      Hex       `json:"request_sha256"`
	Secret       Hex       `json:"secret"`
	Host         string    `json:"host,omitempty"`
	EKKind       string    `json:"ek_kind"`
	EKCert       string    `json:"ek_cert"`
	EKCertSHA256 Hex       `json:"ek_cert_sha256"`
	AKPublic     Hex       `json:"ak_public"`
	AKName       Hex       `json:"ak_name"`
	Issued       time.Time `json:"issued"`
	Expires      time.Time `json:"expires"`
}

// Record is an enrolled AK as the verifier stores it: the AK (its
// TPMT_PUBLIC and PEM) and the EK certificate it was proven to share a TPM
// with. Verification re-checks the certificate against the EK CA given
// then.
type Record struct {
	Version      int       `json:"version"`
	Host         string    `json:"host,omitempty"`
	AKPEM        string    `json:"ak_pem"`
	AKPublic     Hex       `json:"ak_public"`
	AKName       Hex       `json:"ak_name"`
	EKKind       string    `json:"ek_kind"`
	EKCert       string    `json:"ek_cert"`
	EKCertSHA256 Hex       `json:"ek_cert_sha256"`
	EKIssuer     string    `json:"ek_issuer"`
	Enrolled     time.Time `json:"enrolled"`
}

// RequestDigest binds a challenge, its state and the answer to one
// request: SHA-256 over a label and the length-prefixed EK certificate
// (PEM as sent), EK public area and AK public area.
func RequestDigest(r *Request) []byte {
	h := sha256.New()
	h.Write([]byte("tpmmux/v1/enroll-request"))
	for _, b := range [][]byte{[]byte(r.EKKind), []byte(r.EKCert), r.EKPublic, r.AKPublic} {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	return h.Sum(nil)
}
