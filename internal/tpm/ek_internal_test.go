package tpm

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// swtpm_setup persists the RSA EK at 0x81010001 with the TCG template: the
// bridge uses it instead of generating the key again, and it is the key
// CreatePrimary gives. The ECC EK it persists is a P-384 one elsewhere, so
// the ECC EK is created.
func TestPersistentEK(t *testing.T) {
	p, _ := swtpmproc.ManufactureTest(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tp, err := Open(ctx, p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	d := tp.(*dev)
	d.mu.Lock()
	defer d.mu.Unlock()
	h, pub, ok := d.persistentEK(ctx, EKRSA, tpm2.RSAEKTemplate)
	if !ok || h.Handle != ekPersistentRSA {
		t.Fatal("swtpm's persistent RSA EK not used")
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm2.RSAEKTemplate),
	}.Execute(d.tr(ctx))
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.tr(ctx))
	if string(rsp.Name.Buffer) != string(h.Name.Buffer) || pub == nil {
		t.Fatal("the persistent EK is not the template's primary key")
	}
	if _, _, ok := d.persistentEK(ctx, EKECC, tpm2.ECCEKTemplate); ok {
		t.Fatal("an ECC EK at 0x81010002 on swtpm")
	}
}
