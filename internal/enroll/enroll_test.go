package enroll_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// request is what the bridge's enroll-request sends for tp.
func request(t *testing.T, tp tpm.TPM) *enroll.Request {
	t.Helper()
	e, err := tp.(tpm.Enroller).Enrollment(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	return &enroll.Request{Version: enroll.Version, Host: "test-host", EKKind: string(e.Kind),
		EKCertIndex: fmt.Sprintf("0x%08x", e.CertIndex),
		EKCert:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})),
		EKPublic:    e.EKPublic, AKPublic: e.AKPublic}
}

// answer is what the bridge's enroll-answer does with a challenge.
func answer(tp tpm.TPM, c *enroll.Challenge) (*enroll.Answer, error) {
	s, err := tp.(tpm.Enroller).ActivateCredential(context.Background(), tpm.EKKind(c.EKKind), c.CredentialBlob, c.EncryptedSecret)
	if err != nil {
		return nil, err
	}
	return &enroll.Answer{Version: enroll.Version, Request: c.Request, Secret: s}, nil
}

func roots(t *testing.T, pemBytes []byte) *x509.CertPool {
	t.Helper()
	p, _, err := enroll.ParseCAs(pemBytes)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// enrollOK runs challenge, activation and finish and checks the record.
func enrollOK(t *testing.T, tp tpm.TPM, req *enroll.Request, pool *x509.CertPool) *enroll.Record {
	t.Helper()
	chal, st, err := enroll.NewChallenge(req, pool, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ans, err := answer(tp, chal)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := enroll.Finish(st, ans, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode([]byte(rec.AKPEM))
	ak, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !tp.AK().Equal(ak) {
		t.Fatal("the enrolled AK is not the TPM's AK")
	}
	return rec
}

// The whole exchange on the simulator with an EK certificate from a test
// CA, the store, and every way it must refuse.
func TestEnrollSim(t *testing.T) {
	ctx := context.Background()
	tp, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Close()
	ca, err := enrolltest.NewCA("vendor EK CA")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := enrolltest.Provision(ctx, tp, ca); err != nil {
		t.Fatal(err)
	}
	req := request(t, tp)
	pool := roots(t, ca.PEM)
	rec := enrollOK(t, tp, req, pool)
	if rec.EKKind != "ecc" || rec.Host != "test-host" || !strings.Contains(rec.EKIssuer, "vendor EK CA") {
		t.Fatalf("record %+v", rec)
	}

	// The store: saved, found by its AK, re-checked against the CA.
	dir := t.TempDir()
	path, err := enroll.Save(dir, rec)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(path) != dir {
		t.Fatalf("saved at %s", path)
	}
	got, key, err := enroll.Lookup(dir, tp.AK(), pool, time.Now())
	if err != nil || !key.Equal(tp.AK()) || !bytes.Equal(got.AKName, rec.AKName) {
		t.Fatalf("lookup: %v", err)
	}
	if _, key, err := enroll.Lookup(dir, nil, pool, time.Now()); err != nil || !key.Equal(tp.AK()) {
		t.Fatalf("lookup of the only record: %v", err)
	}
	other, err := enrolltest.NewCA("another CA")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := enroll.Lookup(dir, tp.AK(), roots(t, other.PEM), time.Now()); !enroll.IsRejection(err) {
		t.Fatalf("lookup under another CA: %v", err)
	}
	stranger, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var ne *enroll.NotEnrolledError
	if _, _, err := enroll.Lookup(dir, &stranger.PublicKey, pool, time.Now()); !errorsAs(err, &ne) {
		t.Fatalf("lookup of an unknown AK: %v", err)
	}

	// Refusals before any challenge is made.
	mutate := func(f func(r *enroll.Request)) *enroll.Request {
		r := *req
		r.EKPublic = bytes.Clone(req.EKPublic)
		r.AKPublic = bytes.Clone(req.AKPublic)
		f(&r)
		return &r
	}
	ekPub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](req.EKPublic)
	akPub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](req.AKPublic)
	for _, tt := range []struct {
		name string
		req  *enroll.Request
		pool *x509.CertPool
		want string
	}{
		{"EK certificate of another CA", req, roots(t, other.PEM), "does not chain to a trusted EK CA"},
		{"EK not the TCG template", mutate(func(r *enroll.Request) {
			p := *ekPub
			p.ObjectAttributes.Restricted = false
			r.EKPublic = tpm2.Marshal(p)
		}), pool, "not the TCG default ecc EK template"},
		{"EK public key not the certificate's", mutate(func(r *enroll.Request) {
			p := *ekPub
			pt, _ := p.Unique.ECC()
			x := bytes.Clone(pt.X.Buffer)
			x[0] ^= 1
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: x}, Y: pt.Y})
			r.EKPublic = tpm2.Marshal(p)
		}), pool, "not the key of the EK certificate"},
		{"AK that may leave the TPM", mutate(func(r *enroll.Request) {
			p := *akPub
			p.ObjectAttributes.FixedTPM = false
			r.AKPublic = tpm2.Marshal(p)
		}), pool, "fixedTPM"},
		{"AK that is not restricted", mutate(func(r *enroll.Request) {
			p := *akPub
			p.ObjectAttributes.Restricted = false
			r.AKPublic = tpm2.Marshal(p)
		}), pool, "restricted"},
		{"EK kind mismatch", mutate(func(r *enroll.Request) { r.EKKind = "rsa" }), pool, "template"},
		{"garbage certificate", mutate(func(r *enroll.Request) { r.EKCert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" }), pool, "EK certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := enroll.NewChallenge(tt.req, tt.pool, enroll.Options{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}

	// Refusals at finish.
	chal, st, err := enroll.NewChallenge(req, pool, enroll.Options{TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ans, err := answer(tp, chal)
	if err != nil {
		t.Fatal(err)
	}
	bad := *ans
	bad.Secret = bytes.Clone(ans.Secret)
	bad.Secret[0] ^= 1
	if _, err := enroll.Finish(st, &bad, time.Now()); !enroll.IsRejection(err) || !strings.Contains(err.Error(), "did not release") {
		t.Fatalf("wrong secret: %v", err)
	}
	if _, err := enroll.Finish(st, ans, time.Now().Add(2*time.Minute)); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("late answer: %v", err)
	}
	chal2, st2, err := enroll.NewChallenge(req, pool, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(chal2.CredentialBlob, chal.CredentialBlob) || bytes.Equal(st2.Secret, st.Secret) {
		t.Fatal("two challenges share a secret")
	}
	// An old answer does not finish a new challenge.
	if _, err := enroll.Finish(st2, ans, time.Now()); !enroll.IsRejection(err) {
		t.Fatalf("replayed answer: %v", err)
	}
}

// A host cannot pass off an AK of one TPM with the EK certificate of
// another: the credential is encrypted to the certified EK and bound to the
// AK's name, so neither TPM releases the secret. Here the EK certificate is
// swtpm's (issued by swtpm_localca) and the AK the simulator's.
func TestEnrollRefusesForeignAK(t *testing.T) {
	p, ca := swtpmproc.ManufactureTest(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sw, err := tpm.Open(ctx, p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer sw.Close()
	sim, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	bundle, err := ca.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	pool := roots(t, bundle)

	// The honest swtpm host enrolls under the swtpm_localca CA.
	req := request(t, sw)
	if req.EKKind != "rsa" {
		t.Fatalf("swtpm EK kind %s", req.EKKind)
	}
	rec := enrollOK(t, sw, req, pool)
	if rec.EKKind != "rsa" || !strings.Contains(rec.EKIssuer, "swtpm-localca") {
		t.Fatalf("record %+v", rec)
	}

	// The forger: swtpm's EK certificate and EK, the simulator's AK.
	simAK, err := sim.(tpm.Enroller).Enrollment(ctx, tpm.EKECC)
	if err == nil {
		t.Fatal("the simulator has an EK certificate")
	}
	simAKPub := akPublic(t, sim)
	forged := *req
	forged.AKPublic = simAKPub
	_ = simAK
	chal, st, err := enroll.NewChallenge(&forged, pool, enroll.Options{})
	if err != nil {
		t.Fatal(err) // every check on its own passes: only activation can tell
	}
	if _, err := answer(sw, chal); err == nil {
		t.Fatal("swtpm activated a credential for the simulator's AK")
	}
	if _, err := answer(sim, &enroll.Challenge{EKKind: "ecc", Request: chal.Request, CredentialBlob: chal.CredentialBlob, EncryptedSecret: chal.EncryptedSecret}); err == nil {
		t.Fatal("the simulator activated a credential made for swtpm's EK")
	}
	// Guessing fails.
	guess := &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: make([]byte, enroll.SecretSize)}
	if _, err := enroll.Finish(st, guess, time.Now()); !enroll.IsRejection(err) {
		t.Fatalf("guessed answer: %v", err)
	}
}

// akPublic returns the marshalled TPMT_PUBLIC of tp's AK: the AK template
// with the AK's point (the AK is a primary key from that template).
func akPublic(t *testing.T, tp tpm.TPM) []byte {
	t.Helper()
	pub := tpm.AKTemplate()
	k := tp.AK()
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	return tpm2.Marshal(pub)
}
