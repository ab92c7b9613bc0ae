package tpm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// activateRoundTrip makes a credential for the AK's name in software
// (go-tpm's CreateCredential, what a remote verifier does) and has the TPM
// activate it; a credential for another name must not activate.
func activateRoundTrip(t *testing.T, tp tpm.TPM, e *tpm.Enrollment) {
	t.Helper()
	ctx := context.Background()
	en := tp.(tpm.Enroller)
	ek, err := tpm2.Unmarshal[tpm2.TPMTPublic](e.EKPublic)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := tpm2.Unmarshal[tpm2.TPMTPublic](e.AKPublic)
	if err != nil {
		t.Fatal(err)
	}
	akKey, err := tpm2.Pub(*ak)
	if err != nil {
		t.Fatal(err)
	}
	if !tp.AK().Equal(akKey) {
		t.Fatal("the enrollment's AK public area is not the TPM's AK")
	}
	name, err := tpm2.ObjectName(ak)
	if err != nil {
		t.Fatal(err)
	}
	kem, err := tpm2.ImportEncapsulationKey(ek)
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("0123456789abcdef0123456789abcdef")
	blob, enc, err := tpm2.CreateCredential(rand.Reader, kem, name.Buffer, secret)
	if err != nil {
		t.Fatal(err)
	}
	got, err := en.ActivateCredential(ctx, e.Kind, blob, enc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, secret) {
		t.Fatalf("activated %x, want %x", got, secret)
	}
	// A credential for another object's name: the TPM refuses.
	other := append([]byte(nil), name.Buffer...)
	other[len(other)-1] ^= 1
	blob, enc, err = tpm2.CreateCredential(rand.Reader, kem, other, secret)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := en.ActivateCredential(ctx, e.Kind, blob, enc); err == nil {
		t.Fatal("a credential for another name was activated")
	}
	// The wrong EK kind cannot decrypt it either.
	wrong := tpm.EKRSA
	if e.Kind == tpm.EKRSA {
		wrong = tpm.EKECC
	}
	if _, err := en.ActivateCredential(ctx, wrong, blob, enc); err == nil {
		t.Fatal("activated with the other EK")
	}
	// Objects and sessions are flushed: the AK still quotes.
	if _, err := tp.Quote(ctx, []int{23}, []byte("after activation")); err != nil {
		t.Fatal(err)
	}
}

// The simulator has no EK certificate until one is provisioned: then the
// ECC EK certificate is read from NV 0x01c0000a and a credential for the AK
// activates.
func TestEnrollmentSim(t *testing.T) {
	ctx := context.Background()
	tp, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	en := tp.(tpm.Enroller)
	_, err = en.Enrollment(ctx, "")
	var noCert *tpm.NoEKCertError
	if !errors.As(err, &noCert) {
		t.Fatalf("enrollment without an EK certificate: %v", err)
	}
	ca, err := enrolltest.NewCA("sim EK CA")
	if err != nil {
		t.Fatal(err)
	}
	der, err := enrolltest.Provision(ctx, tp, ca)
	if err != nil {
		t.Fatal(err)
	}
	e, err := en.Enrollment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if e.Kind != tpm.EKECC || e.CertIndex != tpm.EKCertIndexECC || !bytes.Equal(e.EKCert, der) {
		t.Fatalf("enrollment %+v", e)
	}
	if _, err := en.Enrollment(ctx, tpm.EKRSA); err == nil {
		t.Fatal("RSA enrollment without an RSA EK certificate")
	}
	activateRoundTrip(t, tp, e)
}

// swtpm manufactured by swtpm_setup with swtpm_localca: the RSA EK
// certificate in NV 0x01c00002 chains to the local CA, its key is the key
// of the EK created from the TCG template, and credential activation works.
func TestEnrollmentSwtpm(t *testing.T) {
	p, ca := swtpmproc.ManufactureTest(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tp, err := tpm.Open(ctx, p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	e, err := tp.(tpm.Enroller).Enrollment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if e.Kind != tpm.EKRSA || e.CertIndex != tpm.EKCertIndexRSA {
		t.Fatalf("enrollment kind %s index 0x%x", e.Kind, e.CertIndex)
	}
	cert, key, err := enroll.ParseEKCert(e.EKCert)
	if err != nil {
		t.Fatal(err)
	}
	bundle, err := ca.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	roots, _, err := enroll.ParseCAs(bundle)
	if err != nil {
		t.Fatal(err)
	}
	if err := enroll.VerifyEKCert(cert, roots, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := enroll.CheckEKPublic("rsa", e.EKPublic, key); err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: x509.NewCertPool()}); err == nil {
		t.Fatal("the EK certificate verifies without its CA")
	}
	activateRoundTrip(t, tp, e)
}
