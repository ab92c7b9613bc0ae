package tpm

import (
	"bytes"
	"context"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// maxCredential bounds the credential blob and encrypted secret of an
// activation (a TPM2B_ID_OBJECT and a TPM2B_ENCRYPTED_SECRET are at most a
// few hundred bytes; an RSA 4096 secret is 512).
const maxCredential = 1024

// ActivateCredential implements Enroller. The EK's authPolicy is
// PolicySecret(TPM_RH_ENDORSEMENT), so the EK is used through a policy
// session that runs TPM2_PolicySecret with the endorsement hierarchy's
// (empty) authorization; the AK, whose userWithAuth is set, authorizes with
// its empty password.
func (d *dev) ActivateCredential(ctx context.Context, kind EKKind, credentialBlob, encryptedSecret []byte) ([]byte, error) {
	if len(credentialBlob) == 0 || len(credentialBlob) > maxCredential || len(encryptedSecret) == 0 || len(encryptedSecret) > maxCredential {
		return nil, fmt.Errorf("tpm %s: activate credential: credential of %d bytes and secret of %d bytes (want 1 to %d each)", d.spec, len(credentialBlob), len(encryptedSecret), maxCredential)
	}
	if err := d.lock("activate credential"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	var out []byte
	err := d.withEK(ctx, kind, func(ek tpm2.NamedHandle, _ *tpm2.TPMTPublic) error {
		policy := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tp transport.TPM, s tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{
				AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
				PolicySession: s,
				NonceTPM:      nonceTPM,
			}.Execute(tp)
			return err
		})
		rsp, err := tpm2.ActivateCredential{
			ActivateHandle: tpm2.AuthHandle{Handle: d.ak, Name: d.akName, Auth: tpm2.PasswordAuth(nil)},
			KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: policy},
			CredentialBlob: tpm2.TPM2BIDObject{Buffer: credentialBlob},
			Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encryptedSecret},
		}.Execute(d.tr(ctx))
		if err != nil {
			return fmt.Errorf("TPM2_ActivateCredential (a credential made for another TPM's EK or another key's name does not activate): %w", err)
		}
		out = bytes.Clone(rsp.CertInfo.Buffer)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("tpm %s: activate credential: %w", d.spec, err)
	}
	return out, nil
}
