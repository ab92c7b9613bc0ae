// Package enrolltest gives tests an EK CA and a way to provision the
// in-process simulator with an EK certificate it issued, so that AK
// enrollment runs on the "sim" backend as on a vendor-provisioned TPM.
// (swtpm gets real EK certificates from swtpm_setup: swtpmproc.Manufacture.)
package enrolltest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/tpm"
)

// CA is a test EK certificate authority (an ECDSA P-256 root).
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// PEM is the root certificate as a verifier's EK CA file holds it.
	PEM []byte
}

// NewCA makes a CA named cn.
func NewCA(cn string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"tpmmux test TPM vendor"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// TCG OIDs of an EK certificate.
var (
	oidEKCertificate   = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidSAN             = asn1.ObjectIdentifier{2, 5, 29, 17}
)

// IssueEK issues an EK certificate for pub in the shape of the TCG EK
// Credential Profile: empty subject, a critical subjectAltName holding a
// directoryName with the TPM manufacturer, model and version, key usage
// keyEncipherment (RSA) or keyAgreement (ECC), extended key usage
// 2.23.133.8.1. It returns the DER.
func (ca *CA) IssueEK(pub crypto.PublicKey) ([]byte, error) {
	dirName := pkix.Name{ExtraNames: []pkix.AttributeTypeAndValue{
		{Type: oidTPMManufacturer, Value: "id:54504D58"},
		{Type: oidTPMModel, Value: "tpmmux-sim"},
		{Type: oidTPMVersion, Value: "id:00010002"},
	}}
	rdn, err := asn1.Marshal(dirName.ToRDNSequence())
	if err != nil {
		return nil, err
	}
	// GeneralNames ::= SEQUENCE OF GeneralName; directoryName is [4]
	// EXPLICIT Name.
	gn, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rdn})
	if err != nil {
		return nil, err
	}
	san, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: gn})
	if err != nil {
		return nil, err
	}
	usage := x509.KeyUsageKeyEncipherment
	if _, ok := pub.(*ecdsa.PublicKey); ok {
		usage = x509.KeyUsageKeyAgreement
	}
	tmpl := &x509.Certificate{
		SerialNumber:       big.NewInt(time.Now().UnixNano()),
		NotBefore:          time.Now().Add(-time.Hour),
		NotAfter:           time.Now().Add(24 * time.Hour),
		KeyUsage:           usage,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{oidEKCertificate},
		ExtraExtensions:    []pkix.Extension{{Id: oidSAN, Critical: true, Value: san}},
	}
	return x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
}

// Provision gives t (the "sim" backend) an EK certificate for its ECC EK,
// issued by ca, in NV index 0x01c0000a, as a TPM vendor would. It returns
// the certificate's DER.
func Provision(ctx context.Context, t tpm.TPM, ca *CA) ([]byte, error) {
	en, ok := t.(tpm.Enroller)
	if !ok {
		return nil, fmt.Errorf("TPM %T cannot enroll", t)
	}
	pub, err := en.EKPublic(ctx, tpm.EKECC)
	if err != nil {
		return nil, err
	}
	key, err := tpm2.Pub(*pub)
	if err != nil {
		return nil, err
	}
	der, err := ca.IssueEK(key)
	if err != nil {
		return nil, err
	}
	if err := tpm.ProvisionEKCert(ctx, t, tpm.EKCertIndexECC, der); err != nil {
		return nil, err
	}
	return der, nil
}
