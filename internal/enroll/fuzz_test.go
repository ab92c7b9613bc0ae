package enroll_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

// FuzzRequest feeds a host's untrusted enrollment material to the
// verifier's checks: they refuse or accept, never panic.
func FuzzRequest(f *testing.F) {
	ca, err := enrolltest.NewCA("fuzz CA")
	if err != nil {
		f.Fatal(err)
	}
	pool, _, _ := enroll.ParseCAs(ca.PEM)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert, _ := ca.IssueEK(&key.PublicKey)
	ak := tpm.AKTemplate()
	f.Add(cert, tpm2.Marshal(tpm2.ECCEKTemplate), tpm2.Marshal(ak), "ecc")
	f.Add([]byte("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"), tpm2.Marshal(tpm2.RSAEKTemplate), []byte{0, 1}, "rsa")
	f.Fuzz(func(t *testing.T, certDER, ekPub, akPub []byte, kind string) {
		enroll.CheckAK(akPub)
		if _, k, err := enroll.ParseEKCert(certDER); err == nil {
			enroll.CheckEKPublic(kind, ekPub, k)
		}
		req := &enroll.Request{Version: enroll.Version, EKKind: kind, EKCert: string(certDER), EKPublic: ekPub, AKPublic: akPub}
		enroll.NewChallenge(req, pool, enroll.Options{})
	})
}
