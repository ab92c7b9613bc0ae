package main

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/enroll/enrolltest"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/quote"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// enrollInto enrolls tp's AK (host name host) under ca into dir, as
// tpmmux-verify enroll challenge and finish do.
func enrollInto(t *testing.T, tp tpm.TPM, host string, ca *enrolltest.CA, dir string) {
	t.Helper()
	ctx := t.Context()
	en := tp.(tpm.Enroller)
	e, err := en.Enrollment(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	req := &enroll.Request{Version: enroll.Version, Host: host, EKKind: string(e.Kind),
		EKCert: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.EKCert})), EKPublic: e.EKPublic, AKPublic: e.AKPublic}
	roots, _, err := enroll.ParseCAs(ca.PEM)
	if err != nil {
		t.Fatal(err)
	}
	chal, st, err := enroll.NewChallenge(req, roots, enroll.Options{})
	if err != nil {
		t.Fatal(err)
	}
	secret, err := en.ActivateCredential(ctx, tpm.EKKind(chal.EKKind), chal.CredentialBlob, chal.EncryptedSecret)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := enroll.Finish(st, &enroll.Answer{Version: enroll.Version, Request: chal.Request, Secret: secret}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := enroll.Save(dir, rec); err != nil {
		t.Fatal(err)
	}
}

// TestMigratedChain: evidence of a VM that moved from the fixture's host
// (simulator) to a second host (swtpm) verifies with both hosts' AKs,
// pinned (--ak twice) or enrolled (--ek-ca --enrolled), and the summary
// shows the segments; with one host's AK, or one host enrolled, it is
// rejected naming the segment.
func TestMigratedChain(t *testing.T) {
	f := getFixture(t)
	ctx := t.Context()
	p := swtpmproc.StartTest(t)
	tb, err := tpm.Open(ctx, p.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Close()
	if _, err := enrolltest.Provision(ctx, tb, f.ca); err != nil {
		t.Fatal(err)
	}
	st, err := logstore.Open(filepath.Join(t.TempDir(), "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	mb, err := mux.Open(ctx, tb, st, mux.Config{Host: "cli-hostb", Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer mb.Close()

	l := mux.Launch{UUID: [16]byte{0x43}, Name: "vm-moved"}
	ident, err := f.m.NewVM(ctx, l)
	if err != nil {
		t.Fatal(err)
	}
	meas := func(m *mux.Mux, i int) {
		r := &record.Record{Kind: record.KindReboot, Time: int64(i), Reboot: &record.Reboot{Reason: "guest-reset"}}
		if _, err := m.Append(ctx, ident.ID(), r); err != nil {
			t.Fatal(err)
		}
	}
	meas(f.m, 1)
	out := record.MigratedOut{DestHost: "cli-hostb", DestAK: quote.AKFingerprint(tb.AK())}
	rand.Read(out.Nonce[:])
	chain, err := f.m.MigrateOut(ctx, ident.ID(), out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mb.MigrateIn(ctx, mux.Arrival{Identity: ident, Launch: l, SourceHost: "cli-host", SourceAK: f.tp.AK(), Chain: chain}); err != nil {
		t.Fatal(err)
	}
	meas(mb, 2)
	nonce, _ := hex.DecodeString(f.nonce)
	ev, err := mb.Evidence(ctx, ident.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := func(n string) string { return filepath.Join(dir, n) }
	evJSON, _ := json.Marshal(ev)
	identJSON, _ := json.Marshal(ident)
	akB, _ := tpm.AKPEM(tb.AK())
	for name, b := range map[string][]byte{"evidence.json": evJSON, "identity.json": identJSON, "akb.pem": akB} {
		if err := os.WriteFile(path(name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	both, onlyA := filepath.Join(dir, "both"), filepath.Join(dir, "onlya")
	enrollInto(t, f.tp, "cli-host", f.ca, both)
	enrollInto(t, tb, "cli-hostb", f.ca, both)
	enrollInto(t, f.tp, "cli-host", f.ca, onlyA)

	args := func(trust ...string) []string {
		return append([]string{"--evidence", path("evidence.json"), "--nonce", f.nonce, "--identity", path("identity.json")}, trust...)
	}
	tests := []struct {
		name  string
		trust []string
		code  int
		want  string
	}{
		{"both AKs pinned", []string{"--ak", f.path("ak.pem"), "--ak", path("akb.pem")}, exitTrusted, "segment 1: host cli-hostb"},
		{"both hosts enrolled", []string{"--ek-ca", f.path("ca.pem"), "--enrolled", both}, exitTrusted, "segment 0: host cli-host,"},
		{"one host's AK pinned", []string{"--ak", f.path("ak.pem")}, exitRejected, "segment 1 (host \"cli-hostb\"): untrusted AK"},
		{"one host enrolled", []string{"--ek-ca", f.path("ca.pem"), "--enrolled", onlyA}, exitRejected, "segment 1 (host \"cli-hostb\"): "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(args(tt.trust...)...)
			if code != tt.code || !strings.Contains(stdout+stderr, tt.want) {
				t.Fatalf("exit %d, want %d with %q:\n%s%s", code, tt.code, tt.want, stdout, stderr)
			}
		})
	}
	code, stdout, stderr := runCLI(args("--ek-ca", f.path("ca.pem"), "--enrolled", both, "--json")...)
	if code != exitTrusted {
		t.Fatalf("json: exit %d: %s", code, stderr)
	}
	r := report(t, stdout)
	if len(r.Segments) != 2 || r.Segments[0].End != "migrated-out" || r.Segments[1].First != 3 || r.Trust == nil || len(r.Trust.AKs) != 2 || r.Trust.Host != "cli-hostb" {
		t.Fatalf("report segments %+v trust %+v", r.Segments, r.Trust)
	}
}
