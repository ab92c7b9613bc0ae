package migrate

import (
	"context"
	"crypto/x509"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
)

func launch(t *testing.T, h *host, name string) *conceal.Identity {
	t.Helper()
	u, err := conceal.NewIdentity([16]byte{})
	if err != nil {
		t.Fatal(err)
	}
	id, err := h.mux.NewVM(t.Context(), mux.Launch{UUID: u.Instance, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func live(t *testing.T, h *host, ident *conceal.Identity) bool {
	t.Helper()
	info, err := h.mux.Info(ident.ID())
	if err != nil {
		t.Fatal(err)
	}
	return info.Live
}

func wantErr(t *testing.T, err error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want one containing %q", subs)
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Fatalf("error %q does not say %q", err, s)
		}
	}
}

// A VM's identity moves from the simulator host to the swtpm host: the
// destination reserves, waits, and gets the same uuid, instance and K once
// the source reports the VM stopped with reason migrated; the source's
// segment ends with verified final evidence; the reservation is gone.
func TestHandover(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, a, "vm1")

	src, err := b.eng.Reserve(ctx, ident.UUID, "vm1")
	if err != nil || src != "hosta" {
		t.Fatalf("reserve: %q %v", src, err)
	}
	if !a.eng.Reserved("vm1") || !b.eng.Pending(ident.UUID) {
		t.Fatal("no reservation on the source or no pending on the destination")
	}
	type res struct {
		a   *Arrival
		err error
	}
	got := make(chan res, 1)
	go func() {
		ar, err := b.eng.Receive(ctx, ident.UUID)
		got <- res{ar, err}
	}()
	select {
	case r := <-got:
		t.Fatalf("handover answered before the VM stopped: %+v", r)
	case <-time.After(300 * time.Millisecond):
	}
	if !live(t, a, ident) {
		t.Fatal("the VM ended on the source before it stopped")
	}
	if !a.eng.SourceStopped("vm1") {
		t.Fatal("SourceStopped: not reserved")
	}
	r := <-got
	if r.err != nil {
		t.Fatal(r.err)
	}
	if *r.a.Identity != *ident {
		t.Fatal("the destination's identity is not the VM's (uuid, instance, K)")
	}
	if r.a.SourceHost != "hosta" || !r.a.SourceAK.Equal(a.tp.AK()) || r.a.Chain == nil {
		t.Fatalf("arrival %+v", r.a)
	}
	if live(t, a, ident) {
		t.Fatal("the VM's segment did not end on the source")
	}
	arrive(t, b, r.a)
	if a.eng.Reserved("vm1") || b.eng.Pending(ident.UUID) {
		t.Fatal("reservation left after done")
	}
	if ents, _ := os.ReadDir(filepath.Join(a.state, "migration", "out")); len(ents) != 0 {
		t.Fatalf("reservation files left: %v", ents)
	}
	// The VM's history on b: two segments, each verified against its
	// host's AK, one verdict.
	if n := attest(t, b, ident, a, b); n != 2 {
		t.Fatalf("%d segments after A -> B", n)
	}
	// And back: A -> B -> A, three segments; A keeps its old one.
	if _, err := a.eng.Reserve(ctx, ident.UUID, "vm1"); err != nil {
		t.Fatal(err)
	}
	b.eng.SourceStopped("vm1")
	ar, err := a.eng.Receive(ctx, ident.UUID)
	if err != nil {
		t.Fatal(err)
	}
	arrive(t, a, ar)
	if n := attest(t, a, ident, a, b); n != 3 {
		t.Fatalf("%d segments after A -> B -> A", n)
	}
}

// The other direction (the swtpm host's RSA EK... is the destination above;
// here the simulator's ECC EK receives), and an abort: the source VM resumes,
// the reservation is dropped, the destination's wait fails and it keeps
// nothing; the VM can then be reserved again.
func TestAbortAndReverse(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, b, "vm2")
	if _, err := a.eng.Reserve(ctx, ident.UUID, "vm2"); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := a.eng.Receive(ctx, ident.UUID)
		errc <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if !b.eng.SourceResumed("vm2") {
		t.Fatal("SourceResumed: no reservation dropped")
	}
	wantErr(t, <-errc, "not migrating")
	if err := a.eng.Cancel(ctx, ident.UUID); err == nil || a.eng.Pending(ident.UUID) {
		t.Fatalf("cancel after the source dropped it: %v, pending %v", err, a.eng.Pending(ident.UUID))
	}
	if !live(t, b, ident) || b.eng.Reserved("vm2") {
		t.Fatal("the source VM lost its history or keeps a reservation")
	}
	// Again, to the end.
	if _, err := a.eng.Reserve(ctx, ident.UUID, "vm2"); err != nil {
		t.Fatal(err)
	}
	b.eng.SourceStopped("vm2")
	ar, err := a.eng.Receive(ctx, ident.UUID)
	if err != nil {
		t.Fatal(err)
	}
	if *ar.Identity != *ident {
		t.Fatal("identity changed")
	}
	arrive(t, a, ar)
	if n := attest(t, a, ident, a, b); n != 2 {
		t.Fatalf("%d segments", n)
	}
}

// Every bad input is refused with a clear message and the source keeps
// its VM: a peer it was not told to trust, a second destination (fork), a
// handover for a VM that is not migrating, a replayed or altered request,
// an altered or replayed answer, an answer for another TPM.
func TestRefusals(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, a, "vm3")
	key := conceal.FormatUUID(ident.UUID)
	pb := b.eng.peers[0] // b's view of a

	// Not migrating.
	var h Handover
	err := b.eng.call(ctx, pb, "/v1/handover", HandoverRequest{UUID: key}, &h)
	wantErr(t, err, "not migrating")
	_, err = b.eng.Receive(ctx, ident.UUID)
	wantErr(t, err, "not an incoming migration")
	// A VM the source does not run.
	_, err = b.eng.Reserve(ctx, [16]byte{1}, "nosuch")
	wantErr(t, err, "no live VM nosuch")

	if _, err := b.eng.Reserve(ctx, ident.UUID, "vm3"); err != nil {
		t.Fatal(err)
	}
	nonce := b.eng.pending[key].nonce

	// A replayed or altered request: another nonce.
	err = b.eng.call(ctx, pb, "/v1/handover", HandoverRequest{UUID: key, Nonce: Nonce{9}}, &h)
	wantErr(t, err, "replayed or altered")
	err = b.eng.call(ctx, pb, "/v1/cancel", HandoverRequest{UUID: key, Nonce: Nonce{9}}, nil)
	wantErr(t, err, "replayed or altered")
	// A reserve naming another destination than the peer's certificate.
	err = b.eng.call(ctx, pb, "/v1/reserve", ReserveRequest{UUID: key, Name: "vm3", DestHost: "hostc", Nonce: Nonce{1}}, nil)
	wantErr(t, err, `names destination "hostc"`)

	// A second destination: host c, trusted by a, is refused as a fork.
	c := &host{name: "hostc", state: t.TempDir(), recPth: b.recPth, tp: b.tp, mux: b.mux}
	if c.pin, err = (&Config{}).CertSHA256(c.state, c.name); err != nil {
		t.Fatal(err)
	}
	if c.l, err = netListen(); err != nil {
		t.Fatal(err)
	}
	start(t, c, ekCA, a)
	start(t, a, ekCA, b, c)
	_, err = c.eng.Reserve(ctx, ident.UUID, "vm3")
	wantErr(t, err, "already reserved for migration to hostb", "fork")

	// A peer a does not trust: d knows a, a does not know d.
	d := &host{name: "hostd", state: t.TempDir(), recPth: b.recPth, tp: b.tp, mux: b.mux}
	if d.pin, err = (&Config{}).CertSHA256(d.state, d.name); err != nil {
		t.Fatal(err)
	}
	if d.l, err = netListen(); err != nil {
		t.Fatal(err)
	}
	start(t, d, ekCA, a)
	_, err = d.eng.Reserve(ctx, ident.UUID, "vm3")
	wantErr(t, err, "certificate")
	// And a peer that presents another certificate than the pinned one.
	d.eng.peers[0].pin = [32]byte{1}
	_, err = d.eng.Reserve(ctx, ident.UUID, "vm3")
	wantErr(t, err, "not the tls_sha256 configured for it")

	// The real handover, answered once the VM stopped.
	a.eng.SourceStopped("vm3")
	pd := *b.eng.pending[key]
	if err := b.eng.call(ctx, pb, "/v1/handover", HandoverRequest{UUID: key, Nonce: nonce}, &h); err != nil {
		t.Fatal(err)
	}
	// Answered again to a retried poll (the same sealed box).
	var h2 Handover
	if err := b.eng.call(ctx, pb, "/v1/handover", HandoverRequest{UUID: key, Nonce: nonce}, &h2); err != nil || string(h2.Sealed) != string(h.Sealed) {
		t.Fatalf("retried poll: %v", err)
	}
	// A handed-over VM cannot be cancelled at the source.
	err = b.eng.call(ctx, pb, "/v1/cancel", HandoverRequest{UUID: key, Nonce: nonce}, nil)
	wantErr(t, err, "already handed over")

	// Altered answers do not open.
	alter := func(f func(x *Handover)) error {
		x := h
		x.Sealed = append([]byte(nil), h.Sealed...)
		x.Credential.Blob = append([]byte(nil), h.Credential.Blob...)
		x.Evidence = append([]byte(nil), h.Evidence...)
		f(&x)
		_, err := b.eng.open(ctx, &pd, ident.UUID, &x)
		return err
	}
	wantErr(t, alter(func(x *Handover) { x.Sealed[len(x.Sealed)-1] ^= 1 }), "does not open")
	wantErr(t, alter(func(x *Handover) { x.Credential.Blob[5] ^= 1 }), "does not activate")
	wantErr(t, alter(func(x *Handover) { x.Nonce[0] ^= 1 }), "replayed or altered")
	wantErr(t, alter(func(x *Handover) {
		ev, err := evidence.Decode(x.Evidence)
		if err != nil {
			t.Fatal(err)
		}
		ev.Quote.Signature[len(ev.Quote.Signature)-1] ^= 1
		if x.Evidence, err = ev.MarshalBinary(); err != nil {
			t.Fatal(err)
		}
	}), "does not verify against hosta's enrolled AK")
	other := pd
	other.nonce[0] ^= 1
	if _, err := b.eng.open(ctx, &other, ident.UUID, &h); err == nil {
		t.Fatal("an answer for another nonce opened")
	}
	// A credential made for b does not activate on a's TPM.
	if _, err := a.tp.(interface {
		Activator
	}).ActivateCredential(ctx, "rsa", h.Credential.Blob, h.Credential.EncryptedSecret); err == nil {
		t.Fatal("a's TPM activated b's credential")
	}
	// The chain's migrated-out record binds this handover: another
	// nonce, credential or destination does not pass.
	ev, err := evidence.Decode(h.Evidence)
	if err != nil {
		t.Fatal(err)
	}
	good := Out{DestHost: "hostb", DestAK: akFP(b.tp.AK()), Nonce: nonce, Credential: h.Credential.Digest()}
	if err := VerifyChain(ev, ident, a.tp.AK(), nil, good); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		f    func(o *Out)
		want string
	}{
		{func(o *Out) { o.Nonce[0] ^= 1 }, "replayed"},
		{func(o *Out) { o.Credential[0] ^= 1 }, "another credential"},
		{func(o *Out) { o.DestAK[0] ^= 1 }, "not to this host"},
		{func(o *Out) { o.DestHost = "hostc" }, "not to this host"},
	} {
		o := good
		tc.f(&o)
		wantErr(t, VerifyChain(ev, ident, a.tp.AK(), nil, o), tc.want)
	}
	// Signed by another AK than the source's: refused.
	wantErr(t, VerifyChain(ev, ident, b.tp.AK(), nil, good), "AK")
	// The genuine answer opens.
	ar, err := b.eng.open(ctx, &pd, ident.UUID, &h)
	if err != nil || *ar.Identity != *ident {
		t.Fatalf("genuine answer: %v", err)
	}
	if err := b.eng.Done(ctx, ident.UUID); err != nil {
		t.Fatal(err)
	}
	// Replayed after done: refused on both sides.
	_, err = b.eng.Receive(ctx, ident.UUID)
	wantErr(t, err, "not an incoming migration")
	err = b.eng.call(ctx, pb, "/v1/handover", HandoverRequest{UUID: key, Nonce: nonce}, &h)
	var re *RemoteError
	if !errors.As(err, &re) || re.Status != http.StatusNotFound {
		t.Fatalf("replayed poll after done: %v", err)
	}
}

// A peer whose enrolled record does not chain to the EK CA, or is missing,
// is refused when the engine starts, with the fix named.
func TestUnenrolledPeer(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	other := filepath.Join(t.TempDir(), "ca.pem")
	vendorOnly, _ := os.ReadFile(ekCA)
	// Only the first certificate (the simulator's vendor): swtpm's b no longer chains.
	end := strings.Index(string(vendorOnly), "-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")
	os.WriteFile(other, vendorOnly[:end], 0o644)
	cfg := Config{EKCA: other, Peers: []Peer{peerOf(b)}}
	_, err := New(Options{Config: cfg, StateDir: a.state, Host: a.name, Mux: testMux{a.mux}})
	wantErr(t, err, "migration peer hostb", "does not chain to a trusted EK CA")
	cfg = Config{EKCA: ekCA, Peers: []Peer{{Name: "hostb", Address: "x:1", TLSSHA256: b.pin, Enrolled: "/nonexistent.json"}}}
	_, err = New(Options{Config: cfg, StateDir: a.state, Host: a.name, Mux: testMux{a.mux}})
	wantErr(t, err, "enroll that host")
	cfg = Config{EKCA: ekCA, Peers: []Peer{{Name: "hostb", Address: "x:1", TLSSHA256: "zz", Enrolled: b.recPth}}}
	_, err = New(Options{Config: cfg, StateDir: a.state, Host: a.name, Mux: testMux{a.mux}})
	wantErr(t, err, "not 64 hex digits")
	// A record of the bridge's own AK is refused.
	cfg = Config{EKCA: ekCA, Peers: []Peer{{Name: "self", Address: "x:1", TLSSHA256: b.pin, Enrolled: a.recPth}}}
	_, err = New(Options{Config: cfg, StateDir: a.state, Host: a.name, AK: a.tp.AK(), Mux: testMux{a.mux}})
	wantErr(t, err, "own AK")
}

// A restarted source answers the handover it had made (durable
// reservation, same sealed box, evidence from the ended instance).
func TestSourceRestart(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, a, "vm4")
	if _, err := b.eng.Reserve(ctx, ident.UUID, "vm4"); err != nil {
		t.Fatal(err)
	}
	// Restart before the stop: the reservation survives.
	start(t, a, ekCA, b)
	if !a.eng.Reserved("vm4") {
		t.Fatal("reservation lost in a restart")
	}
	a.eng.SourceStopped("vm4")
	ar, err := b.eng.Receive(ctx, ident.UUID)
	if err != nil || *ar.Identity != *ident {
		t.Fatalf("receive after source restart: %v", err)
	}
	// The source restarts after handing over, before the destination's
	// done: the same handover is answered again (the evidence from the
	// ended instance), and it still opens.
	start(t, a, ekCA, b)
	pd := *b.eng.pending[conceal.FormatUUID(ident.UUID)]
	var h Handover
	if err := b.eng.call(ctx, b.eng.peers[0], "/v1/handover", HandoverRequest{UUID: conceal.FormatUUID(ident.UUID), Nonce: pd.nonce}, &h); err != nil {
		t.Fatal(err)
	}
	if ar2, err := b.eng.open(ctx, &pd, ident.UUID, &h); err != nil || *ar2.Identity != *ident {
		t.Fatalf("handover after a source restart: %v", err)
	}
	arrive(t, b, ar)
	if n := attest(t, b, ident, a, b); n != 2 {
		t.Fatalf("%d segments", n)
	}
}

// A -> B -> C where C peers only with B (it does not know A's AK): C
// verifies B's segment and the chaining, takes A's as B verified it, and
// the tenant's verifier, with all three AKs, gets one verdict over three
// segments.
func TestThreeHosts(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	c := thirdHost(t, ekCA)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a, c)
	start(t, c, ekCA, b)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, a, "vm5")
	move := func(from, to *host) {
		t.Helper()
		if _, err := to.eng.Reserve(ctx, ident.UUID, "vm5"); err != nil {
			t.Fatal(err)
		}
		from.eng.SourceStopped("vm5")
		ar, err := to.eng.Receive(ctx, ident.UUID)
		if err != nil {
			t.Fatal(err)
		}
		arrive(t, to, ar)
	}
	move(a, b)
	move(b, c)
	if n := attest(t, c, ident, a, b, c); n != 3 {
		t.Fatalf("%d segments", n)
	}
}

// A reservation nobody hands over expires after the handover timeout (a
// destination that went away does not keep the VM's stops taken for a
// migration's); and a destination whose enrollment no longer holds at
// the handover (its EK certificate no longer chains to the EK CA) gets
// nothing, the VM staying live on the source.
func TestExpiryAndReenrollment(t *testing.T) {
	a, b, ekCA := twoHosts(t)
	start(t, a, ekCA, b)
	start(t, b, ekCA, a)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	ident := launch(t, a, "vm6")
	if _, err := b.eng.Reserve(ctx, ident.UUID, "vm6"); err != nil {
		t.Fatal(err)
	}
	clock := time.Now()
	a.eng.o.Now = func() time.Time { return clock }
	clock = clock.Add(a.eng.timeout + time.Second)
	if a.eng.Reserved("vm6") {
		t.Fatal("the reservation did not expire")
	}
	a.eng.o.Now = time.Now
	// Reserved again; the EK CA no longer trusts b's EK issuer.
	if _, err := b.eng.Reserve(ctx, ident.UUID, "vm6"); err != nil {
		t.Fatal(err)
	}
	a.eng.roots = x509.NewCertPool()
	a.eng.SourceStopped("vm6")
	_, err := b.eng.Receive(ctx, ident.UUID)
	wantErr(t, err, "enrollment no longer holds")
	if !live(t, a, ident) {
		t.Fatal("the VM's segment ended on the source")
	}
}
