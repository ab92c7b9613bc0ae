package daemon

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// The TPM side of AK enrollment (control ops enroll-request and
// enroll-answer; internal/enroll has the verifier's side). The bridge only
// reads its EK certificate and lets the TPM activate a credential: nothing
// a verifier sends can make the TPM do more than release a secret made for
// this TPM's own AK.

var _ control.EnrollHandler = controlHandler{}

func (d *Daemon) enroller() (tpm.Enroller, error) {
	en, ok := d.tpm.(tpm.Enroller)
	if !ok {
		return nil, fmt.Errorf("the TPM backend (%s) cannot do AK enrollment", d.tpmName())
	}
	return en, nil
}

// EnrollRequest returns the host's enrollment request: the EK certificate
// the TPM vendor provisioned (RSA, else ECC), the EK and AK public areas.
func (d controlHandler) EnrollRequest(ctx context.Context) (_ *enroll.Request, err error) {
	defer d.count(control.OpEnrollRequest, &err)
	en, err := d.enroller()
	if err != nil {
		return nil, err
	}
	e, err := en.Enrollment(ctx, "")
	if err != nil {
		return nil, err
	}
	return &enroll.Request{
		Version: enroll.Version, Host: d.host, EKKind: string(e.Kind),
		EKCertIndex: fmt.Sprintf("0x%08x", e.CertIndex),
		EKCert:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})),
		EKPublic:    e.EKPublic, AKPublic: e.AKPublic, Created: time.Now().UTC().Truncate(time.Second),
	}, nil
}

// EnrollAnswer has the TPM activate a verifier's credential for the AK and
// returns the secret.
func (d controlHandler) EnrollAnswer(ctx context.Context, c *enroll.Challenge) (_ *enroll.Answer, err error) {
	defer d.count(control.OpEnrollAnswer, &err)
	if c.Version != enroll.Version {
		return nil, fmt.Errorf("enroll-answer: challenge version %d, want %d", c.Version, enroll.Version)
	}
	switch tpm.EKKind(c.EKKind) {
	case tpm.EKRSA, tpm.EKECC:
	default:
		return nil, fmt.Errorf("enroll-answer: EK kind %q", c.EKKind)
	}
	if !c.Expires.IsZero() && time.Now().After(c.Expires) {
		return nil, fmt.Errorf("enroll-answer: the challenge expired at %s: ask the verifier for a new one", c.Expires.Format(time.RFC3339))
	}
	en, err := d.enroller()
	if err != nil {
		return nil, err
	}
	secret, err := en.ActivateCredential(ctx, tpm.EKKind(c.EKKind), c.CredentialBlob, c.EncryptedSecret)
	if err != nil {
		return nil, errors.Join(errors.New("enroll-answer: this TPM does not activate the challenge (made for another TPM's EK or another AK?)"), err)
	}
	d.log.Info("AK enrollment challenge activated", "ek", c.EKKind)
	return &enroll.Answer{Version: enroll.Version, Request: c.Request, Secret: secret}, nil
}
