package enroll

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/quote"
)

// SecretSize is the size of the credential secret (the EK templates'
// name algorithm is SHA-256, which bounds the credential to 32 bytes).
const SecretSize = 32

// DefaultTTL is how long a challenge may be answered.
const DefaultTTL = time.Hour

// Rejection says why enrollment was refused: the host's material does not
// prove what it claims (as opposed to a malformed file or an I/O error).
type Rejection struct{ Reason string }

func (r *Rejection) Error() string { return r.Reason }

func reject(format string, a ...any) error {
	return &Rejection{Reason: fmt.Sprintf(format, a...)}
}

// IsRejection reports whether err is a Rejection.
func IsRejection(err error) bool {
	var r *Rejection
	return errors.As(err, &r)
}

// ParseCAs reads the PEM bundle of EK CA certificates a verifier trusts.
// Every certificate in it is a trust anchor: put in the roots (and, to
// trust only part of a hierarchy, the intermediates) that issue EK
// certificates.
func ParseCAs(pemBytes []byte) (*x509.CertPool, []*x509.Certificate, error) {
	pool := x509.NewCertPool()
	var certs []*x509.Certificate
	for rest := pemBytes; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("EK CA certificate %d: %w", len(certs)+1, err)
		}
		pool.AddCert(c)
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, nil, errors.New("no PEM CERTIFICATE block in the EK CA file")
	}
	return pool, certs, nil
}

// oidSAN is the subjectAltName extension. TCG EK certificates have an empty
// subject and a critical SAN holding only a directoryName (TPM
// manufacturer, model, version), which Go's x509 does not interpret and so
// lists as an unhandled critical extension.
var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// oidRSAESOAEP is the public key algorithm some vendors put in RSA EK
// certificates (id-RSAES-OAEP); the key itself is a PKCS #1 RSAPublicKey.
var oidRSAESOAEP = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 7}

// ParseEKCert parses an EK certificate (PEM or DER) and returns it with
// its public key.
func ParseEKCert(b []byte) (*x509.Certificate, crypto.PublicKey, error) {
	der := b
	if blk, _ := pem.Decode(b); blk != nil {
		if blk.Type != "CERTIFICATE" {
			return nil, nil, fmt.Errorf("EK certificate: PEM block %q, want CERTIFICATE", blk.Type)
		}
		der = blk.Bytes
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("EK certificate: %w", err)
	}
	c.UnhandledCriticalExtensions = slices.DeleteFunc(c.UnhandledCriticalExtensions, func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSAN) })
	pub := c.PublicKey
	if pub == nil {
		var spki struct {
			Algorithm pkix.AlgorithmIdentifier
			PublicKey asn1.BitString
		}
		if _, err := asn1.Unmarshal(c.RawSubjectPublicKeyInfo, &spki); err != nil {
			return nil, nil, fmt.Errorf("EK certificate public key: %w", err)
		}
		if !spki.Algorithm.Algorithm.Equal(oidRSAESOAEP) {
			return nil, nil, fmt.Errorf("EK certificate public key algorithm %v is not supported", spki.Algorithm.Algorithm)
		}
		if pub, err = x509.ParsePKCS1PublicKey(spki.PublicKey.RightAlign()); err != nil {
			return nil, nil, fmt.Errorf("EK certificate RSAES-OAEP public key: %w", err)
		}
	}
	return c, pub, nil
}

// VerifyEKCert checks that cert chains to one of roots at time now. EK
// certificates carry the TCG EK certificate extended key usage
// (2.23.133.8.1), so any extended key usage is accepted.
func VerifyEKCert(cert *x509.Certificate, roots *x509.CertPool, now time.Time) error {
	_, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return reject("the EK certificate (issuer %q, serial %s) does not chain to a trusted EK CA: %v", cert.Issuer.String(), cert.SerialNumber, err)
	}
	return nil
}

// ekTemplate is the TCG default EK template of kind (the same as
// tpm.EKTemplate, kept here so the verifier needs no TPM package).
func ekTemplate(kind string) (tpm2.TPMTPublic, error) {
	switch kind {
	case "rsa":
		return tpm2.RSAEKTemplate, nil
	case "ecc":
		return tpm2.ECCEKTemplate, nil
	}
	return tpm2.TPMTPublic{}, fmt.Errorf("unknown EK kind %q (want rsa or ecc)", kind)
}

// CheckEKPublic parses the EK's TPMT_PUBLIC and requires that it is the TCG
// default EK template of kind (restricted decryption key, fixedTPM,
// fixedParent, sensitiveDataOrigin, adminWithPolicy with the
// PolicySecret(endorsement) policy, AES-128-CFB, SHA-256) whose key is the
// certificate's key.
func CheckEKPublic(kind string, raw []byte, certKey crypto.PublicKey) (*tpm2.TPMTPublic, error) {
	tmpl, err := ekTemplate(kind)
	if err != nil {
		return nil, err
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](raw)
	if err != nil {
		return nil, reject("EK public area: %v", err)
	}
	if pub.Type != tmpl.Type {
		return nil, reject("the EK public area is type 0x%04x, not the TCG default %s EK template", uint16(pub.Type), kind)
	}
	tmpl.Unique = pub.Unique
	if m, ok := marshal(tmpl); !ok || !bytes.Equal(m, raw) {
		return nil, reject("the EK public area is not the TCG default %s EK template (attributes, policy or parameters differ)", kind)
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, reject("EK public key: %v", err)
	}
	eq, ok := key.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !eq.Equal(certKey) {
		return nil, reject("the EK public area's key is not the key of the EK certificate")
	}
	return pub, nil
}

// CheckAK parses the AK's TPMT_PUBLIC and requires the attributes of a key
// that never left the TPM and signs only TPM-generated data: restricted,
// sign, not decrypt, fixedTPM, fixedParent, sensitiveDataOrigin; and the
// shape the verifier checks quotes with: ECC NIST P-256, ECDSA with
// SHA-256, name algorithm SHA-256. It returns the key and the AK's name.
func CheckAK(raw []byte) (*ecdsa.PublicKey, []byte, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](raw)
	if err != nil {
		return nil, nil, reject("AK public area: %v", err)
	}
	if m, ok := marshal(*pub); !ok || !bytes.Equal(m, raw) {
		return nil, nil, reject("AK public area does not re-encode to itself (trailing bytes?)")
	}
	a := pub.ObjectAttributes
	var missing []string
	for _, c := range []struct {
		ok   bool
		name string
	}{
		{a.FixedTPM, "fixedTPM"}, {a.FixedParent, "fixedParent"}, {a.SensitiveDataOrigin, "sensitiveDataOrigin"},
		{a.Restricted, "restricted"}, {a.SignEncrypt, "sign"}, {!a.Decrypt, "not decrypt"},
	} {
		if !c.ok {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return nil, nil, reject("the AK is not a TPM-resident restricted signing key: %v missing", missing)
	}
	if pub.Type != tpm2.TPMAlgECC || pub.NameAlg != tpm2.TPMAlgSHA256 {
		return nil, nil, reject("the AK is type 0x%04x with name algorithm 0x%04x, want ECC with SHA-256", uint16(pub.Type), uint16(pub.NameAlg))
	}
	parms, err := pub.Parameters.ECCDetail()
	if err != nil {
		return nil, nil, reject("AK parameters: %v", err)
	}
	if parms.CurveID != tpm2.TPMECCNistP256 || parms.Scheme.Scheme != tpm2.TPMAlgECDSA {
		return nil, nil, reject("the AK is not an ECDSA P-256 key (curve 0x%04x, scheme 0x%04x)", uint16(parms.CurveID), uint16(parms.Scheme.Scheme))
	}
	if d, err := parms.Scheme.Details.ECDSA(); err != nil || d.HashAlg != tpm2.TPMAlgSHA256 {
		return nil, nil, reject("the AK's signing scheme is not ECDSA with SHA-256")
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, nil, reject("AK public key: %v", err)
	}
	ec, ok := key.(*ecdsa.PublicKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, nil, reject("AK public key is %T, want ECDSA P-256", key)
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, nil, reject("AK name: %v", err)
	}
	return ec, name.Buffer, nil
}

// Options tune NewChallenge.
type Options struct {
	// Now is the verification time (default time.Now()).
	Now time.Time
	// TTL is how long the challenge may be answered (default DefaultTTL).
	TTL time.Duration
	// Rand is the randomness source (default crypto/rand).
	Rand io.Reader
}

// NewChallenge checks a host's request against the trusted EK CAs and
// makes the credential (TPM2_MakeCredential, in software) the host's TPM
// must activate. The State holds the secret: keep it for Finish.
func NewChallenge(req *Request, roots *x509.CertPool, o Options) (*Challenge, *State, error) {
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	if o.TTL <= 0 {
		o.TTL = DefaultTTL
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	if req.Version != Version {
		return nil, nil, fmt.Errorf("enrollment request version %d, want %d", req.Version, Version)
	}
	cert, certKey, err := ParseEKCert([]byte(req.EKCert))
	if err != nil {
		return nil, nil, reject("%v", err)
	}
	if err := VerifyEKCert(cert, roots, o.Now); err != nil {
		return nil, nil, err
	}
	ekPub, err := CheckEKPublic(req.EKKind, req.EKPublic, certKey)
	if err != nil {
		return nil, nil, err
	}
	_, akName, err := CheckAK(req.AKPublic)
	if err != nil {
		return nil, nil, err
	}
	kem, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, nil, reject("EK as encryption key: %v", err)
	}
	secret := make([]byte, SecretSize)
	if _, err := io.ReadFull(o.Rand, secret); err != nil {
		return nil, nil, err
	}
	blob, encSecret, err := tpm2.CreateCredential(o.Rand, kem, akName, secret)
	if err != nil {
		return nil, nil, fmt.Errorf("make credential: %w", err)
	}
	digest := RequestDigest(req)
	certSum := sha256.Sum256(cert.Raw)
	exp := o.Now.Add(o.TTL).UTC().Truncate(time.Second)
	chal := &Challenge{Version: Version, Request: digest, EKKind: req.EKKind, AKName: akName,
		CredentialBlob: blob, EncryptedSecret: encSecret, Expires: exp}
	st := &State{Version: Version, Request: digest, Secret: secret, Host: req.Host, EKKind: req.EKKind,
		EKCert: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})), EKCertSHA256: certSum[:],
		AKPublic: req.AKPublic, AKName: akName, Issued: o.Now.UTC().Truncate(time.Second), Expires: exp}
	return chal, st, nil
}

// Finish compares the host's answer with the kept secret and returns the
// enrolled AK.
func Finish(st *State, ans *Answer, now time.Time) (*Record, error) {
	if now.IsZero() {
		now = time.Now()
	}
	if st.Version != Version || ans.Version != Version {
		return nil, fmt.Errorf("enrollment state version %d, answer version %d, want %d", st.Version, ans.Version, Version)
	}
	if len(st.Secret) != SecretSize {
		return nil, errors.New("enrollment state holds no secret")
	}
	if !bytes.Equal(st.Request, ans.Request) {
		return nil, reject("the answer is for another enrollment request (%x, this state is for %x)", ans.Request, st.Request)
	}
	if now.After(st.Expires) {
		return nil, reject("the challenge expired at %s", st.Expires.Format(time.RFC3339))
	}
	if subtle.ConstantTimeCompare(st.Secret, ans.Secret) != 1 {
		return nil, reject("the host's TPM did not release the challenge secret: its AK is not in the TPM of the certified EK")
	}
	key, name, err := CheckAK(st.AKPublic)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(name, st.AKName) {
		return nil, errors.New("enrollment state is inconsistent: AK name")
	}
	cert, _, err := ParseEKCert([]byte(st.EKCert))
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, err
	}
	return &Record{Version: Version, Host: st.Host,
		AKPEM:    string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
		AKPublic: st.AKPublic, AKName: st.AKName, EKKind: st.EKKind, EKCert: st.EKCert,
		EKCertSHA256: st.EKCertSHA256, EKIssuer: cert.Issuer.String(), Enrolled: now.UTC().Truncate(time.Second)}, nil
}

// AKFingerprint is the SHA-256 of the AK's PKIX DER encoding, in hex: the
// enrolled AK's file name in a store.
func AKFingerprint(ak *ecdsa.PublicKey) (string, error) {
	if _, err := x509.MarshalPKIXPublicKey(ak); err != nil {
		return "", err
	}
	sum := quote.AKFingerprint(ak)
	return hex.EncodeToString(sum[:]), nil
}

// marshal is tpm2.Marshal without its panic on inconsistent unions.
func marshal(p tpm2.TPMTPublic) (b []byte, ok bool) {
	defer func() {
		if recover() != nil {
			b, ok = nil, false
		}
	}()
	return tpm2.Marshal(p), true
}
