package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// Sealer seals small secrets to the TPM: a sealed blob can be opened only by
// the same TPM (its storage hierarchy seed), so a copy of the bridge's state
// directory alone reveals nothing. The "sim", "swtpm" and "device" backends
// implement it.
type Sealer interface {
	// Seal wraps data (at most 128 bytes) under the TPM's storage root key.
	Seal(ctx context.Context, data []byte) ([]byte, error)
	// Unseal opens a blob Seal made on this TPM.
	Unseal(ctx context.Context, blob []byte) ([]byte, error)
}

// maxSealed bounds sealed data (TPM2B_SENSITIVE_DATA on common TPMs).
const maxSealed = 128

// sealedTemplate is a keyed-hash data object: no signing, no decryption,
// bound to its parent and TPM, usable with an empty password.
func sealedTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:     true,
			FixedParent:  true,
			UserWithAuth: true,
			NoDA:         true,
		},
	}
}

// withSRK creates the TCG reference ECC P-256 storage root key under the
// owner hierarchy (deterministic from the seed, so every call yields the
// same key), runs fn with it and flushes it.
func (d *dev) withSRK(ctx context.Context, fn func(srk tpm2.NamedHandle) error) error {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(d.tr(ctx))
	if err != nil {
		return fmt.Errorf("create storage root key: %w", err)
	}
	err = fn(tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name})
	_, ferr := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.tr(ctx))
	return errors.Join(err, ferr)
}

// Seal implements Sealer. The blob is u16 length + TPM2B_PUBLIC, then the
// TPM2B_PRIVATE (which the TPM encrypted under the SRK).
func (d *dev) Seal(ctx context.Context, data []byte) ([]byte, error) {
	if len(data) == 0 || len(data) > maxSealed {
		return nil, fmt.Errorf("tpm %s: seal: %d bytes, want 1 to %d", d.spec, len(data), maxSealed)
	}
	if err := d.lock("seal"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	var blob []byte
	err := d.withSRK(ctx, func(srk tpm2.NamedHandle) error {
		rsp, err := tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: data}),
			}},
			InPublic: tpm2.New2B(sealedTemplate()),
		}.Execute(d.tr(ctx))
		if err != nil {
			return fmt.Errorf("create sealed object: %w", err)
		}
		pub := tpm2.Marshal(rsp.OutPublic)
		priv := tpm2.Marshal(rsp.OutPrivate)
		blob = binary.BigEndian.AppendUint16(nil, uint16(len(pub)))
		blob = append(blob, pub...)
		blob = append(blob, priv...)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("tpm %s: seal: %w", d.spec, err)
	}
	return blob, nil
}

// Unseal implements Sealer.
func (d *dev) Unseal(ctx context.Context, blob []byte) ([]byte, error) {
	if len(blob) < 2 || int(binary.BigEndian.Uint16(blob))+2 > len(blob) {
		return nil, fmt.Errorf("tpm %s: unseal: malformed blob of %d bytes", d.spec, len(blob))
	}
	n := int(binary.BigEndian.Uint16(blob))
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](blob[2 : 2+n])
	if err != nil {
		return nil, fmt.Errorf("tpm %s: unseal: public part: %w", d.spec, err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](blob[2+n:])
	if err != nil {
		return nil, fmt.Errorf("tpm %s: unseal: private part: %w", d.spec, err)
	}
	if err := d.lock("unseal"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	var out []byte
	err = d.withSRK(ctx, func(srk tpm2.NamedHandle) error {
		lr, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
			InPrivate:    *priv,
			InPublic:     *pub,
		}.Execute(d.tr(ctx))
		if err != nil {
			return fmt.Errorf("load sealed object (was it sealed by another TPM?): %w", err)
		}
		ur, uerr := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: lr.ObjectHandle, Name: lr.Name, Auth: tpm2.PasswordAuth(nil)}}.Execute(d.tr(ctx))
		_, ferr := tpm2.FlushContext{FlushHandle: lr.ObjectHandle}.Execute(d.tr(ctx))
		if uerr != nil {
			return errors.Join(fmt.Errorf("unseal: %w", uerr), ferr)
		}
		out = append([]byte(nil), ur.OutData.Buffer...)
		return ferr
	})
	if err != nil {
		return nil, fmt.Errorf("tpm %s: unseal: %w", d.spec, err)
	}
	return out, nil
}
