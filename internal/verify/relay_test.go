package verify_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// guestTLS is a VM's attestation endpoint: a TLS server with the VM's own
// key that answers a verifier's nonce with evidence. An honest VM answers
// with its own evidence; a relaying VM forwards the nonce to another VM and
// answers with that VM's (genuine, fresh) evidence.
type guestTLS struct {
	ln     net.Listener
	answer func(nonce []byte) (*evidence.Evidence, error)
}

func newGuestTLS(t *testing.T, key *ecdsa.PrivateKey, answer func([]byte) (*evidence.Evidence, error)) *guestTLS {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "guest"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"guest"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	if err != nil {
		t.Fatal(err)
	}
	g := &guestTLS{ln: ln, answer: answer}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				nonce := make([]byte, 32)
				if _, err := c.Read(nonce); err != nil {
					return
				}
				ev, err := g.answer(nonce)
				if err != nil {
					return
				}
				b, _ := ev.MarshalBinary()
				c.Write(b)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return g
}

// attestPeer is the verifier: it opens TLS to addr (the VM it means to
// attest), sends a fresh nonce, reads the evidence, and verifies it for
// the identity it expects, requiring the TLS peer's key to be bound in the
// VM's log.
func attestPeer(t *testing.T, w *world, addr string, ident *conceal.Identity) (*verify.Report, error) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) // the binding check is the peer check here
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := c.ConnectionState().PeerCertificates[0].PublicKey
	nonce := make([]byte, 32)
	rand.Read(nonce)
	if _, err := c.Write(nonce); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	var buf []byte
	tmp := make([]byte, 64<<10)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			break
		}
	}
	ev, err := evidence.Decode(buf)
	if err != nil {
		t.Fatal(err)
	}
	kh, err := verify.KeyHash(peer)
	if err != nil {
		t.Fatal(err)
	}
	o := opts(w, ident, nonce)
	o.BindKeys = [][32]byte{kh}
	return verify.Verify(ev, o)
}

// The relay attack of Eckel et al. (IFIP SEC 2020) and its countermeasure:
// each VM's agent binds its TLS key into its own log. The verifier talks
// TLS to VM X but receives VM Y's genuine, fresh evidence (X relayed the
// challenge to Y): the evidence verifies for Y, but X's key is not bound in
// Y's log, so it is rejected. Talking to Y itself, it is accepted.
func TestRelayAttackRejected(t *testing.T) {
	w := getWorld(t)
	ctx := context.Background()
	keyX, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	keyY, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var idX, idY *conceal.Identity
	for _, v := range []struct {
		name string
		uuid byte
		key  *ecdsa.PrivateKey
		id   **conceal.Identity
	}{{"vm-x", 0x0e, keyX, &idX}, {"vm-y", 0x0f, keyY, &idY}} {
		id, err := w.m.NewVM(ctx, mux.Launch{UUID: [16]byte{v.uuid}, Name: v.name})
		if err != nil {
			t.Fatal(err)
		}
		kh, err := verify.KeyHash(&v.key.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.m.Append(ctx, id.ID(), &record.Record{Kind: record.KindBinding, Time: 1, Binding: &record.Binding{Purpose: "tls", KeyHash: kh}}); err != nil {
			t.Fatal(err)
		}
		*v.id = id
	}
	evidenceOf := func(id *conceal.Identity) func([]byte) (*evidence.Evidence, error) {
		return func(n []byte) (*evidence.Evidence, error) { return w.m.Evidence(ctx, id.ID(), n) }
	}
	honestY := newGuestTLS(t, keyY, evidenceOf(idY))
	relayX := newGuestTLS(t, keyX, evidenceOf(idY)) // X forwards the nonce to Y

	rep, err := attestPeer(t, w, honestY.ln.Addr().String(), idY)
	if err != nil {
		t.Fatalf("honest VM rejected: %v", err)
	}
	if !rep.Trusted || len(rep.BoundKeys) != 1 || !rep.BoundKeys[0].Bound || rep.BoundKeys[0].Purpose != "tls" {
		t.Fatalf("report: %+v", rep.BoundKeys)
	}

	rep, err = attestPeer(t, w, relayX.ln.Addr().String(), idY)
	var rj *verify.Rejection
	if !errors.As(err, &rj) {
		t.Fatalf("relayed evidence: %v", err)
	}
	khX, _ := verify.KeyHash(&keyX.PublicKey)
	if !strings.Contains(rj.Reason, "is not bound in vm vm-y's log") || !strings.Contains(rj.Reason, strings.ToLower(hexOf(khX[:]))) {
		t.Fatalf("reason %q", rj.Reason)
	}
	if rep.Trusted || rep.BoundKeys[0].Bound {
		t.Fatalf("report %+v", rep)
	}
	// The same relayed evidence is otherwise perfect: without the binding
	// requirement it verifies. That is the attack the binding stops.
	if _, err := attestPeerNoBinding(t, w, relayX.ln.Addr().String(), idY); err != nil {
		t.Fatalf("relayed evidence without the binding check: %v", err)
	}

	// The binding requirement holds across incremental verification: the
	// checkpoint keeps Y's bindings.
	nonce := []byte("relay-checkpoint")
	full, err := w.m.Evidence(ctx, idY.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	khY, _ := verify.KeyHash(&keyY.PublicKey)
	o := opts(w, idY, nonce)
	o.BindKeys = [][32]byte{khY}
	rep, err = verify.Verify(full, o)
	if err != nil {
		t.Fatal(err)
	}
	nonce2 := []byte("relay-checkpoint-2")
	delta, err := w.m.EvidenceSince(ctx, idY.ID(), nonce2, rep.Checkpoint.Since())
	if err != nil {
		t.Fatal(err)
	}
	o = opts(w, idY, nonce2)
	o.Checkpoint, o.BindKeys = rep.Checkpoint, [][32]byte{khY}
	if _, err := verify.Verify(delta, o); err != nil {
		t.Fatalf("delta with the kept binding: %v", err)
	}
	o.BindKeys = [][32]byte{khX}
	if _, err := verify.Verify(delta, o); err == nil {
		t.Fatal("delta accepted X's key")
	}
}

func attestPeerNoBinding(t *testing.T, w *world, addr string, ident *conceal.Identity) (*verify.Report, error) {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nonce := make([]byte, 32)
	rand.Read(nonce)
	c.Write(nonce)
	c.CloseWrite()
	var buf []byte
	tmp := make([]byte, 64<<10)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			break
		}
	}
	ev, err := evidence.Decode(buf)
	if err != nil {
		t.Fatal(err)
	}
	return verify.Verify(ev, opts(w, ident, nonce))
}

func hexOf(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// KeyHashPEM agrees with KeyHash for a public key, a certificate and a
// private key of the same key pair.
func TestKeyHashPEM(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	want, err := verify.KeyHash(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	cert, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	p8, _ := x509.MarshalPKCS8PrivateKey(key)
	for typ, der := range map[string][]byte{"PUBLIC KEY": spki, "CERTIFICATE": cert, "PRIVATE KEY": p8} {
		got, err := verify.KeyHashPEM(pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
		if err != nil || got != want {
			t.Errorf("%s: %x, %v; want %x", typ, got, err, want)
		}
	}
	if _, err := verify.KeyHashPEM([]byte("nothing")); err == nil {
		t.Error("no PEM accepted")
	}
}
