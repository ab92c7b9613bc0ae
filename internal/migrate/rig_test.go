package migrate

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// host is one bridge of the test: a real TPM (the in-process simulator or
// a manufactured swtpm), a real multiplexer on it, its enrolled record,
// and its migration engine.
type host struct {
	name   string
	tp     tpm.TPM
	mux    *mux.Mux
	rec    *enroll.Record
	recPth string
	state  string
	pin    string
	l      net.Listener
	eng    *Engine
	cancel context.CancelFunc
	done   chan struct{}
}

// testMux is the engine's Mux on a real multiplexer.
type testMux struct{ *mux.Mux }

func (m testMux) MigrateOut(ctx context.Context, id conceal.Digest, out Out) (*evidence.Evidence, error) {
	return m.Mux.MigrateOut(ctx, id, MigratedOut(out))
}

// arrive opens the arrived VM's segment on h (mux MigrateIn), as the
// daemon does, and tells the source the handover is done.
func arrive(t testing.TB, h *host, ar *Arrival) conceal.Digest {
	t.Helper()
	id, err := h.mux.MigrateIn(t.Context(), mux.Arrival{Identity: ar.Identity, Launch: mux.Launch{Name: ar.Name},
		SourceHost: ar.SourceHost, SourceAK: ar.SourceAK, Chain: ar.Chain, VPCRs: ar.VPCRs})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.eng.Done(t.Context(), ar.Identity.UUID); err != nil {
		t.Fatal(err)
	}
	return id
}

// attest verifies h's fresh evidence of the VM against every host's AK
// and returns the number of segments.
func attest(t testing.TB, h *host, ident *conceal.Identity, hosts ...*host) int {
	t.Helper()
	nonce := []byte("a fresh verifier nonce, 32 bytes")
	ev, err := h.mux.Evidence(t.Context(), ident.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	var aks []*ecdsa.PublicKey
	for _, x := range hosts {
		aks = append(aks, x.tp.AK())
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: ident, AKs: aks})
	if err != nil {
		t.Fatalf("evidence of %s on %s: %v", conceal.FormatUUID(ident.UUID), h.name, err)
	}
	return len(rep.Segments)
}

// twoHosts starts host a on the simulator (ECC EK, test vendor CA) and
// host b on swtpm (RSA EK from swtpm_setup), enrolls both, and writes the
// EK CA bundle both trust. The engines are not made yet (newEngine).
func twoHosts(t testing.TB) (a, b *host, ekCA string) {
	return twoHostsOn(t, false)
}

// twoHostsOn is twoHosts; with bothSwtpm host a runs on a second
// manufactured swtpm instead of the simulator (the benchmark: both hosts'
// TPMs behind a socket, as a real TPM is behind a device).
func twoHostsOn(t testing.TB, bothSwtpm bool) (a, b *host, ekCA string) {
	t.Helper()
	ctx := t.Context()
	p, swCA := swtpmproc.ManufactureTest(t, "")
	dir := t.TempDir()
	a = &host{name: "hosta", state: filepath.Join(dir, "a")}
	b = &host{name: "hostb", state: filepath.Join(dir, "b")}
	var err error
	bundle, err := swCA.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	var cas []byte
	if bothSwtpm {
		pa, caA := swtpmproc.ManufactureTest(t, "")
		if a.tp, err = tpm.Open(ctx, pa.Spec()); err != nil {
			t.Fatal(err)
		}
		ba, err := caA.Bundle()
		if err != nil {
			t.Fatal(err)
		}
		cas = append(append([]byte{}, ba...), bundle...)
	} else {
		if a.tp, err = tpm.Open(ctx, "sim"); err != nil {
			t.Fatal(err)
		}
		vendor, err := enrolltest.NewCA("vendor EK CA")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := enrolltest.Provision(ctx, a.tp, vendor); err != nil {
			t.Fatal(err)
		}
		cas = append(append([]byte{}, vendor.PEM...), bundle...)
	}
	t.Cleanup(func() { a.tp.Close() })
	if b.tp, err = tpm.Open(ctx, p.Spec()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.tp.Close() })
	ekCA = filepath.Join(dir, "ek-ca.pem")
	if err := os.WriteFile(ekCA, cas, 0o644); err != nil {
		t.Fatal(err)
	}
	pool, _, err := enroll.ParseCAs(cas)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []*host{a, b} {
		if err := os.MkdirAll(h.state, 0o700); err != nil {
			t.Fatal(err)
		}
		h.rec = enrollHost(t, h.tp, h.name, pool)
		if h.recPth, err = enroll.Save(filepath.Join(dir, "enrolled-"+h.name), h.rec); err != nil {
			t.Fatal(err)
		}
		st, err := logstore.Open(filepath.Join(h.state, "log.db"), &logstore.Options{NoSync: true})
		if err != nil {
			t.Fatal(err)
		}
		m, err := mux.Open(ctx, h.tp, st, mux.Config{Host: h.name, Logger: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close(); st.Close() })
		h.mux = m
		if h.pin, err = (&Config{}).CertSHA256(h.state, h.name); err != nil {
			t.Fatal(err)
		}
		if h.l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.l.Close() })
	}
	return a, b, ekCA
}

func quiet() *slog.Logger {
	if testing.Verbose() {
		return slog.Default()
	}
	return slog.New(slog.DiscardHandler)
}

// enrollHost runs the enrollment of docs/trust.md for tp.
func enrollHost(t testing.TB, tp tpm.TPM, name string, pool *x509.CertPool) *enroll.Record {
	t.Helper()
	ctx := t.Context()
	en := tp.(tpm.Enroller)
	e, err := en.Enrollment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	req := &enroll.Request{Version: enroll.Version, Host: name, EKKind: string(e.Kind),
		EKCertIndex: fmt.Sprintf("0x%08x", e.CertIndex),
		EKCert:      string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})),
		EKPublic:    e.EKPublic, AKPublic: e.AKPublic}
	chal, st, err := enroll.NewChallenge(req, pool, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := en.ActivateCredential(ctx, tpm.EKKind(chal.EKKind), chal.CredentialBlob, chal.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := enroll.Finish(st, &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: s}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// peerOf is h as a peer in another host's configuration.
func peerOf(h *host) Peer {
	return Peer{Name: h.name, Address: h.l.Addr().String(), TLSSHA256: h.pin, Enrolled: h.recPth}
}

// start makes h's engine with peers and serves it on h's listener.
func start(t testing.TB, h *host, ekCA string, peers ...*host) {
	t.Helper()
	if h.eng != nil {
		h.cancel()
		<-h.done
		l, err := net.Listen("tcp", h.l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		h.l = l
	}
	cfg := Config{EKCA: ekCA, HandoverTimeout: "30s"}
	for _, p := range peers {
		cfg.Peers = append(cfg.Peers, peerOf(p))
	}
	eng, err := New(Options{Config: cfg, StateDir: h.state, Host: h.name, AK: h.tp.AK(), Mux: testMux{h.mux},
		TPM: h.tp.(tpm.Enroller), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	h.eng, h.cancel, h.done = eng, cancel, done
	go func() {
		defer close(done)
		eng.Serve(ctx, h.l)
	}()
	t.Cleanup(func() { cancel(); <-done })
}

func netListen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// thirdHost adds host c on another manufactured swtpm, its EK CA appended
// to ekCA, enrolled; engines are started afterwards (start).
func thirdHost(t testing.TB, ekCA string) *host {
	t.Helper()
	ctx := t.Context()
	p, ca := swtpmproc.ManufactureTest(t, "")
	c := &host{name: "hostc", state: t.TempDir()}
	var err error
	if c.tp, err = tpm.Open(ctx, p.Spec()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.tp.Close() })
	bundle, err := ca.Bundle()
	if err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(ekCA)
	if err != nil {
		t.Fatal(err)
	}
	cas := append(old, bundle...)
	if err := os.WriteFile(ekCA, cas, 0o644); err != nil {
		t.Fatal(err)
	}
	pool, _, err := enroll.ParseCAs(cas)
	if err != nil {
		t.Fatal(err)
	}
	c.rec = enrollHost(t, c.tp, c.name, pool)
	if c.recPth, err = enroll.Save(filepath.Join(t.TempDir(), "enrolled-c"), c.rec); err != nil {
		t.Fatal(err)
	}
	st, err := logstore.Open(filepath.Join(c.state, "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mux.Open(ctx, c.tp, st, mux.Config{Host: c.name, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); st.Close() })
	c.mux = m
	if c.pin, err = (&Config{}).CertSHA256(c.state, c.name); err != nil {
		t.Fatal(err)
	}
	if c.l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.l.Close() })
	return c
}
