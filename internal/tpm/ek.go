package tpm

import (
	"bytes"
	"context"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// The NV indices where a TPM vendor stores the endorsement key (EK)
// certificates of the TCG default EK templates (TCG EK Credential Profile
// for TPM Family 2.0, "low range").
const (
	// EKCertIndexRSA holds the certificate of the RSA 2048 EK (template L-1).
	EKCertIndexRSA uint32 = 0x01c00002
	// EKCertIndexECC holds the certificate of the ECC NIST P-256 EK
	// (template L-2).
	EKCertIndexECC uint32 = 0x01c0000a
)

// maxEKCert bounds an EK certificate read from NV (real ones are 1 to 2 KiB).
const maxEKCert = 8192

// EKKind names one of the two TCG default EK templates.
type EKKind string

// The EK kinds.
const (
	EKRSA EKKind = "rsa" // RSA 2048, AES-128-CFB, SHA-256, template L-1
	EKECC EKKind = "ecc" // ECC NIST P-256, AES-128-CFB, SHA-256, template L-2
)

// EKTemplate returns the TCG default EK template of kind (go-tpm's
// RSAEKTemplate or ECCEKTemplate: a restricted decryption key under the
// endorsement hierarchy whose authPolicy is PolicySecret(TPM_RH_ENDORSEMENT))
// and the NV index of its certificate.
func EKTemplate(kind EKKind) (tpm2.TPMTPublic, uint32, error) {
	switch kind {
	case EKRSA:
		return tpm2.RSAEKTemplate, EKCertIndexRSA, nil
	case EKECC:
		return tpm2.ECCEKTemplate, EKCertIndexECC, nil
	}
	return tpm2.TPMTPublic{}, 0, fmt.Errorf("unknown EK kind %q (want %s or %s)", kind, EKRSA, EKECC)
}

// Enrollment is what a host sends a verifier to enroll its AK: the EK
// certificate a vendor provisioned, the EK's and the AK's public areas
// (marshalled TPMT_PUBLIC, so the verifier sees the keys' attributes and
// can compute the AK's name).
type Enrollment struct {
	Kind      EKKind
	CertIndex uint32
	EKCert    []byte // DER
	EKPublic  []byte // TPMT_PUBLIC
	AKPublic  []byte // TPMT_PUBLIC
}

// Enroller is the TPM side of AK enrollment by MakeCredential /
// ActivateCredential (credential activation). The "sim", "swtpm" and
// "device" backends implement it.
type Enroller interface {
	// Enrollment reads the EK certificate of kind ("" picks RSA when its
	// certificate is present, else ECC), creates the EK from its TCG
	// template, and returns both public areas with the AK's.
	Enrollment(ctx context.Context, kind EKKind) (*Enrollment, error)
	// ActivateCredential has the EK of kind decrypt a credential made for
	// the AK's name (TPM2_ActivateCredential, with the EK's policy
	// session) and returns the secret in it. The TPM releases it only if
	// the AK is loaded in this TPM and its name is the one the credential
	// was made for.
	ActivateCredential(ctx context.Context, kind EKKind, credentialBlob, encryptedSecret []byte) ([]byte, error)
	// EKPublic creates the EK of kind and returns its public area.
	EKPublic(ctx context.Context, kind EKKind) (*tpm2.TPMTPublic, error)
}

var _ Enroller = (*dev)(nil)

// NoEKCertError says the TPM has no EK certificate where the TCG profile
// puts it.
type NoEKCertError struct {
	Index uint32
	Err   error
}

func (e *NoEKCertError) Error() string {
	return fmt.Sprintf("no EK certificate in NV index 0x%08x (a vendor-provisioned TPM has one; for swtpm run swtpm_setup --create-ek-cert): %v", e.Index, e.Err)
}

func (e *NoEKCertError) Unwrap() error { return e.Err }

// Enrollment implements Enroller.
func (d *dev) Enrollment(ctx context.Context, kind EKKind) (*Enrollment, error) {
	if err := d.lock("enrollment"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	kinds := []EKKind{kind}
	if kind == "" {
		kinds = []EKKind{EKRSA, EKECC}
	}
	var out *Enrollment
	var errs []error
	for _, k := range kinds {
		_, idx, err := EKTemplate(k)
		if err != nil {
			return nil, fmt.Errorf("tpm %s: enrollment: %w", d.spec, err)
		}
		cert, err := d.readNV(ctx, idx)
		if err != nil {
			errs = append(errs, &NoEKCertError{Index: idx, Err: err})
			continue
		}
		out = &Enrollment{Kind: k, CertIndex: idx, EKCert: cert}
		break
	}
	if out == nil {
		return nil, fmt.Errorf("tpm %s: enrollment: %w", d.spec, errors.Join(errs...))
	}
	ek, err := d.ekPublic(ctx, out.Kind)
	if err != nil {
		return nil, fmt.Errorf("tpm %s: enrollment: %w", d.spec, err)
	}
	ak, err := d.akPublicArea(ctx)
	if err != nil {
		return nil, fmt.Errorf("tpm %s: enrollment: %w", d.spec, err)
	}
	out.EKPublic, out.AKPublic = tpm2.Marshal(ek), tpm2.Marshal(ak)
	return out, nil
}

// EKPublic implements Enroller.
func (d *dev) EKPublic(ctx context.Context, kind EKKind) (*tpm2.TPMTPublic, error) {
	if err := d.lock("EK public"); err != nil {
		return nil, err
	}
	defer d.mu.Unlock()
	p, err := d.ekPublic(ctx, kind)
	if err != nil {
		return nil, fmt.Errorf("tpm %s: %w", d.spec, err)
	}
	return p, nil
}

func (d *dev) ekPublic(ctx context.Context, kind EKKind) (*tpm2.TPMTPublic, error) {
	var pub *tpm2.TPMTPublic
	err := d.withEK(ctx, kind, func(ek tpm2.NamedHandle, p *tpm2.TPMTPublic) error {
		pub = p
		return nil
	})
	return pub, err
}

// The persistent handles where provisioning puts the EKs (TCG TPM v2.0
// Provisioning Guidance: 0x81010001 RSA, 0x81010002 ECC).
const (
	ekPersistentRSA tpm2.TPMHandle = 0x81010001
	ekPersistentECC tpm2.TPMHandle = 0x81010002
)

// persistentEK returns the EK of kind at its persistent handle when one is
// there and its public area is the TCG template (only its key may differ):
// using it spares an RSA key generation, which takes seconds on some TPMs
// while every other command waits. The caller holds d.mu.
func (d *dev) persistentEK(ctx context.Context, kind EKKind, tmpl tpm2.TPMTPublic) (tpm2.NamedHandle, *tpm2.TPMTPublic, bool) {
	h := ekPersistentRSA
	if kind == EKECC {
		h = ekPersistentECC
	}
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(d.tr(ctx))
	if err != nil {
		return tpm2.NamedHandle{}, nil, false
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil || pub.Type != tmpl.Type {
		return tpm2.NamedHandle{}, nil, false
	}
	want := tmpl
	want.Unique = pub.Unique
	if !bytes.Equal(safeMarshal(want), rsp.OutPublic.Bytes()) {
		return tpm2.NamedHandle{}, nil, false
	}
	return tpm2.NamedHandle{Handle: h, Name: rsp.Name}, pub, true
}

// safeMarshal is tpm2.Marshal without its panic on inconsistent unions.
func safeMarshal(p tpm2.TPMTPublic) (b []byte) {
	defer func() {
		if recover() != nil {
			b = nil
		}
	}()
	return tpm2.Marshal(p)
}

// withEK runs fn with the EK of kind: the provisioned persistent EK when it
// is the TCG template, else the EK created from the template under the
// endorsement hierarchy (a primary key: the same key every time), flushed
// afterwards. The caller holds d.mu.
func (d *dev) withEK(ctx context.Context, kind EKKind, fn func(ek tpm2.NamedHandle, pub *tpm2.TPMTPublic) error) error {
	tmpl, _, err := EKTemplate(kind)
	if err != nil {
		return err
	}
	if h, pub, ok := d.persistentEK(ctx, kind, tmpl); ok {
		return fn(h, pub)
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(d.tr(ctx))
	if err != nil {
		return fmt.Errorf("create the %s EK: %w", kind, err)
	}
	pub, perr := rsp.OutPublic.Contents()
	if perr == nil {
		err = fn(tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, pub)
	} else {
		err = fmt.Errorf("parse the EK public area: %w", perr)
	}
	_, ferr := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.tr(ctx))
	return errors.Join(err, ferr)
}

// akPublicArea reads the loaded AK's public area. The caller holds d.mu.
func (d *dev) akPublicArea(ctx context.Context) (*tpm2.TPMTPublic, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: d.ak}.Execute(d.tr(ctx))
	if err != nil {
		return nil, fmt.Errorf("read the AK public area: %w", err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("parse the AK public area: %w", err)
	}
	if name, err := tpm2.ObjectName(pub); err != nil || string(name.Buffer) != string(d.akName.Buffer) {
		return nil, errors.New("the AK's public area does not match its name")
	}
	return pub, nil
}

// readNV reads a whole NV index (an EK certificate): with the index's own
// empty authorization (TPMA_NV_AUTHREAD), or else the owner's. A
// certificate is cut to its DER length (some vendors pad the index). The
// caller holds d.mu.
func (d *dev) readNV(ctx context.Context, index uint32) ([]byte, error) {
	h := tpm2.TPMHandle(index)
	pr, err := tpm2.NVReadPublic{NVIndex: h}.Execute(d.tr(ctx))
	if err != nil {
		return nil, err
	}
	pub, err := pr.NVPublic.Contents()
	if err != nil {
		return nil, fmt.Errorf("NV index 0x%08x public area: %w", index, err)
	}
	size := int(pub.DataSize)
	if size == 0 || size > maxEKCert {
		return nil, fmt.Errorf("NV index 0x%08x holds %d bytes", index, size)
	}
	chunk := 1024
	if v, err := d.property(ctx, tpm2.TPMPTNVBufferMax); err == nil && v > 0 && int(v) < chunk {
		chunk = int(v)
	}
	nv := tpm2.NamedHandle{Handle: h, Name: pr.NVName}
	auths := []tpm2.AuthHandle{
		{Handle: h, Name: pr.NVName, Auth: tpm2.PasswordAuth(nil)},
		{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
	}
	var errs []error
	for _, auth := range auths {
		if auth.Handle == h && !pub.Attributes.AuthRead {
			continue
		}
		if auth.Handle == tpm2.TPMRHOwner && !pub.Attributes.OwnerRead {
			continue
		}
		out := make([]byte, 0, size)
		for len(out) < size {
			n := min(chunk, size-len(out))
			rsp, err := tpm2.NVRead{AuthHandle: auth, NVIndex: nv, Size: uint16(n), Offset: uint16(len(out))}.Execute(d.tr(ctx))
			if err != nil {
				errs = append(errs, err)
				out = nil
				break
			}
			if len(rsp.Data.Buffer) != n {
				return nil, fmt.Errorf("NV index 0x%08x: read %d bytes, asked for %d", index, len(rsp.Data.Buffer), n)
			}
			out = append(out, rsp.Data.Buffer...)
		}
		if out != nil {
			return trimDER(out), nil
		}
	}
	if len(errs) == 0 {
		return nil, fmt.Errorf("NV index 0x%08x is readable neither with its own nor with the owner's authorization", index)
	}
	return nil, fmt.Errorf("read NV index 0x%08x: %w", index, errors.Join(errs...))
}

// trimDER cuts b to the length of the DER value it starts with, if it
// starts with one; otherwise it returns b unchanged.
func trimDER(b []byte) []byte {
	var v asn1.RawValue
	rest, err := asn1.Unmarshal(b, &v)
	if err != nil {
		return b
	}
	return b[:len(b)-len(rest)]
}

// ProvisionEKCert writes der as the EK certificate at index, as a TPM
// vendor's manufacturing does: the index is defined under the platform
// hierarchy (PPWRITE, PPREAD, OWNERREAD, AUTHREAD, NO_DA, PLATFORMCREATE),
// replacing one that exists. It needs the platform hierarchy's empty
// authorization, which only a simulator or a freshly started swtpm has;
// tests use it to give the "sim" backend an EK certificate.
func ProvisionEKCert(ctx context.Context, t TPM, index uint32, der []byte) error {
	d, ok := devOf(t)
	if !ok {
		return fmt.Errorf("provision EK certificate: backend %T does not support it", t)
	}
	if len(der) == 0 || len(der) > maxEKCert {
		return fmt.Errorf("provision EK certificate: %d bytes", len(der))
	}
	if err := d.lock("provision EK certificate"); err != nil {
		return err
	}
	defer d.mu.Unlock()
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	h := tpm2.TPMHandle(index)
	if _, err := (tpm2.NVReadPublic{NVIndex: h}).Execute(d.tr(ctx)); err == nil {
		if _, err := (tpm2.NVUndefineSpace{AuthHandle: platform, NVIndex: h}).Execute(d.tr(ctx)); err != nil {
			return fmt.Errorf("provision EK certificate: remove the old index: %w", err)
		}
	}
	pub := tpm2.TPMSNVPublic{
		NVIndex: h,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: true,
			NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
		},
		DataSize: uint16(len(der)),
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: platform, PublicInfo: tpm2.New2B(pub)}).Execute(d.tr(ctx)); err != nil {
		return fmt.Errorf("provision EK certificate: define NV index 0x%08x: %w", index, err)
	}
	name, err := tpm2.NVName(&pub)
	if err != nil {
		return err
	}
	for off := 0; off < len(der); off += 512 {
		end := min(off+512, len(der))
		_, err := tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    tpm2.NamedHandle{Handle: h, Name: *name},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}.Execute(d.tr(ctx))
		if err != nil {
			return fmt.Errorf("provision EK certificate: write NV index 0x%08x: %w", index, err)
		}
	}
	return nil
}

// devOf returns the dev behind a TPM of this package.
func devOf(t TPM) (*dev, bool) {
	switch v := t.(type) {
	case *dev:
		return v, true
	case *simTPM:
		return v.dev, true
	}
	return nil, false
}
