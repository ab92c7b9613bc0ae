package verify

import (
	"cmp"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/tpmmux/tpmmux/internal/record"
)

// Appraiser appraises a VM's records against a tenant's policy (step 5):
// the launch measurement in the genesis record and each measurement
// record. internal/policy implements it for Keylime runtime policies with
// the tpmmux launch section.
type Appraiser interface {
	// AppraiseGenesis checks the launch measurement (domain XML and
	// kernel, initrd, firmware digests).
	AppraiseGenesis(g *record.Genesis) []Violation
	// AppraiseMeasurement checks record seq, a guest IMA entry. It is
	// called in record order.
	AppraiseMeasurement(seq uint64, m *record.Measurement) []Violation
}

// ArrivalAppraiser is an Appraiser that also appraises the launch
// measurement of each host a VM migrated to: the domain XML and files its
// migrated-in record (record seq) measured.
type ArrivalAppraiser interface {
	AppraiseArrival(seq uint64, in *record.MigratedIn) []Violation
}

// VPCRAppraiser is an Appraiser that also pins a vTPM VM's measured boot:
// it is given the replayed vPCRs (nil for a VM without a vTPM) once the
// records are verified.
type VPCRAppraiser interface {
	AppraiseVPCRs(r *VTPMReport) []Violation
}

// Appraisal is the appraiser's account of what it checked, beyond the
// violations: how many entries it appraised or excluded, which it ignored
// as Keylime does (and why), and the IMA signatures it saw.
type Appraisal struct {
	// Policy is the SHA-256 of the policy file.
	Policy string `json:"policy_sha256,omitempty"`
	// LogHashAlg is the policy's ima.log_hash_alg.
	LogHashAlg string `json:"log_hash_alg,omitempty"`
	Appraised  int    `json:"appraised"`
	Excluded   int    `json:"excluded"`
	// Ignored are entries accepted without appraisal, each with the reason
	// (e.g. a time-of-measure/time-of-use violation entry, which Keylime
	// skips by default).
	Ignored []Violation `json:"ignored,omitempty"`
	// Notes say what the appraisal could not check.
	Notes      []string    `json:"notes,omitempty"`
	Signatures *Signatures `json:"signatures,omitempty"`
	Launch     *Launch     `json:"launch,omitempty"`
}

// Signatures reports the IMA signatures (ima-sig entries' sig field) of
// the appraised entries.
type Signatures struct {
	// Keys are the key ids (hex, the last 4 bytes of the key's subject key
	// identifier) of the keys the appraiser verifies with.
	Keys       []string         `json:"keys"`
	Signed     int              `json:"signed"`
	Verified   int              `json:"verified"`
	Unverified int              `json:"unverified"`
	Entries    []SignatureEntry `json:"entries,omitempty"`
}

// SignatureEntry is one signed entry and what its signature check found.
type SignatureEntry struct {
	Seq      uint64 `json:"seq"`
	LogIndex uint64 `json:"log_index"`
	Path     string `json:"path"`
	// KeyID is the signature's key id (hex), HashAlg its hash algorithm.
	KeyID   string `json:"key_id,omitempty"`
	HashAlg string `json:"hash_alg,omitempty"`
	// Status is verified, no-key (no key with its id), bad-signature,
	// mismatch (hash algorithm not the file digest's) or malformed.
	Status string `json:"status"`
}

// Launch reports the appraisal of the launch measurement.
type Launch struct {
	Checked []string `json:"checked"`
	OK      bool     `json:"ok"`
}

// BoundKey is a key the verifier required to be bound in the VM's log
// (Options.BindKeys).
type BoundKey struct {
	SHA256  string `json:"sha256"`
	Bound   bool   `json:"bound"`
	Seq     uint64 `json:"seq,omitempty"`
	Purpose string `json:"purpose,omitempty"`
}

// TrustReport says where the verifier's trust in the AK came from.
type TrustReport struct {
	// AK is "pinned" (a key file the verifier was given) or "enrolled"
	// (an AK enrolled by credential activation under an EK CA).
	AK       string `json:"ak"`
	AKSHA256 string `json:"ak_sha256"`
	// AKs are every trusted AK of a verification against several hosts
	// (a migrated VM's chain of segments).
	AKs []string `json:"aks_sha256,omitempty"`
	// For an enrolled AK: the EK certificate it shares a TPM with, its
	// issuer, the host that enrolled and when.
	EKCertSHA256 string    `json:"ek_cert_sha256,omitempty"`
	EKIssuer     string    `json:"ek_issuer,omitempty"`
	Host         string    `json:"host,omitempty"`
	Enrolled     time.Time `json:"enrolled,omitzero"`
}

// KeyHash is the hash a binding record carries for a public key: SHA-256
// of the key's DER SubjectPublicKeyInfo (x509.MarshalPKIXPublicKey; the
// same bytes as `openssl pkey -pubin -outform DER`).
func KeyHash(pub crypto.PublicKey) ([32]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return [32]byte{}, fmt.Errorf("key hash: %w", err)
	}
	return sha256.Sum256(der), nil
}

// KeyHashPEM is KeyHash of the first public key in a PEM file: a PUBLIC
// KEY block, a CERTIFICATE (its subject's key), or a private key (its
// public half).
func KeyHashPEM(b []byte) ([32]byte, error) {
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			return [32]byte{}, errors.New("key hash: no PEM public key, certificate or private key")
		}
		switch blk.Type {
		case "PUBLIC KEY":
			if _, err := x509.ParsePKIXPublicKey(blk.Bytes); err != nil {
				return [32]byte{}, fmt.Errorf("key hash: %w", err)
			}
			return sha256.Sum256(blk.Bytes), nil
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return [32]byte{}, fmt.Errorf("key hash: %w", err)
			}
			return sha256.Sum256(c.RawSubjectPublicKeyInfo), nil
		case "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY":
			var k any
			var err error
			switch blk.Type {
			case "PRIVATE KEY":
				k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
			case "EC PRIVATE KEY":
				k, err = x509.ParseECPrivateKey(blk.Bytes)
			default:
				k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
			}
			if err != nil {
				return [32]byte{}, fmt.Errorf("key hash: %w", err)
			}
			s, ok := k.(crypto.Signer)
			if !ok {
				return [32]byte{}, fmt.Errorf("key hash: private key %T has no public key", k)
			}
			return KeyHash(s.Public())
		}
	}
}

// bindingAt notes a binding record.
func (rep *Report) bindingAt(seq uint64, b *record.Binding) {
	if rep.bound == nil {
		rep.bound = make(map[[32]byte]BoundKey)
	}
	if _, ok := rep.bound[b.KeyHash]; !ok {
		rep.bound[b.KeyHash] = BoundKey{SHA256: hex.EncodeToString(b.KeyHash[:]), Bound: true, Seq: seq, Purpose: b.Purpose}
	}
}

// checkBindings requires every key of keys to be bound in the VM's log
// (the relay-attack countermeasure of Eckel et al.: the verifier's peer,
// e.g. its TLS server key, must be the VM the evidence is about).
func (rep *Report) checkBindings(keys [][32]byte) error {
	var missing []string
	for _, k := range keys {
		b, ok := rep.bound[k]
		if !ok {
			b = BoundKey{SHA256: hex.EncodeToString(k[:])}
			missing = append(missing, b.SHA256)
		}
		rep.BoundKeys = append(rep.BoundKeys, b)
	}
	if len(missing) > 0 {
		name := rep.VM.Name
		if name == "" {
			name = rep.VM.UUID
		}
		return &Rejection{Step: 5, Reason: fmt.Sprintf("key %s is not bound in vm %s's log: the peer is not this VM (relayed evidence?)", missing[0], name)}
	}
	return nil
}

// loadBindings takes the bindings a checkpoint kept.
func (rep *Report) loadBindings(bs []BoundKey) error {
	for _, b := range bs {
		h, err := hex.DecodeString(b.SHA256)
		if err != nil || len(h) != 32 {
			return errors.New("checkpoint: malformed binding")
		}
		var k [32]byte
		copy(k[:], h)
		if rep.bound == nil {
			rep.bound = make(map[[32]byte]BoundKey)
		}
		rep.bound[k] = b
	}
	return nil
}

// boundList lists the bindings seen, in record order.
func (rep *Report) boundList() []BoundKey {
	out := make([]BoundKey, 0, len(rep.bound))
	for _, b := range rep.bound {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b BoundKey) int { return cmp.Compare(a.Seq, b.Seq) })
	return out
}

// LaunchFile is a file of the launch measurement (genesis record) as the
// report shows it: its digest in hex, as a launch policy pins it.
type LaunchFile struct {
	Role   string `json:"role"`
	Path   string `json:"path"`
	SHA256 string `json:"sha256,omitempty"`
	Error  string `json:"error,omitempty"`
}

func launchFiles(fs []record.File) []LaunchFile {
	var out []LaunchFile
	for _, f := range fs {
		out = append(out, LaunchFile{Role: f.Role, Path: f.Path, SHA256: hex.EncodeToString(f.SHA256), Error: f.Error})
	}
	return out
}
