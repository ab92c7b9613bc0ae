package migrate

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Out is what the source's migrated-out record names (record.MigratedOut).
type Out struct {
	DestHost   string
	DestAK     [32]byte // sha256 of the destination AK's PKIX DER
	Nonce      [32]byte // the destination's handover nonce
	Credential [32]byte // Credential.Digest of the credential that carried K
}

// Mux is the multiplexer as the engine uses it (mux.Mux's MigrateOut,
// Lookup and Identity).
type Mux interface {
	// Lookup finds the live instance of the domain named name.
	Lookup(name string) (conceal.Digest, bool)
	// Identity is instance id's identity, K included.
	Identity(id conceal.Digest) (*conceal.Identity, error)
	// MigrateOut ends the VM's segment here with a migrated-out record and
	// returns the final evidence of its chain; called again with the same
	// out (a handover answered again after a restart) it returns the same.
	MigrateOut(ctx context.Context, id conceal.Digest, out Out) (*evidence.Evidence, error)
}

// Activator is the destination's TPM: it releases a credential's secret
// only when made for its EK and its AK's name (tpm.Enroller).
type Activator interface {
	ActivateCredential(ctx context.Context, kind tpm.EKKind, blob, encryptedSecret []byte) ([]byte, error)
}

// Arrival is what a destination received, opened and verified: the VM's
// identity, the source's final chain evidence (checked against the
// source's enrolled AK), and what mux.MigrateIn needs besides the launch.
type Arrival struct {
	Identity   *conceal.Identity
	Name       string
	SourceHost string
	SourceAK   *ecdsa.PublicKey
	Chain      *evidence.Evidence
	VPCRs      *vpcr.Snapshot
	Nonce      [32]byte
	Credential [32]byte
}

// Options configure an Engine.
type Options struct {
	Config   Config
	StateDir string // reservations live in STATE_DIR/migration/out
	Host     string // this bridge's host name (its records')
	// AK is this bridge's AK (the destination checks that the peer's
	// enrolled record of itself is not what it pins: no self-peering).
	AK  *ecdsa.PublicKey
	Mux Mux
	// TPM activates handovers on the destination (with the EK kind of
	// its enrolled record, which the source names).
	TPM Activator
	// VerifyChain checks a source's final chain evidence for the identity
	// (the destination's check before MigrateIn): the last segment against
	// the source's AK, earlier ones against any trusted AK (every peer's
	// and this host's), and that it ends with the migrated-out record
	// naming out. Default: the package's VerifyChain.
	VerifyChain func(ev *evidence.Evidence, id *conceal.Identity, sourceAK *ecdsa.PublicKey, trusted []*ecdsa.PublicKey, out Out) error
	// Snapshot, when set, gives the vPCR snapshot of a vTPM VM (nil for
	// another VM) when libvirt reports it stopped for migration
	// (SourceStopped); it travels sealed with the identity.
	Snapshot func(name string) (*vpcr.Snapshot, error)
	Logger   *slog.Logger
	Now      func() time.Time
}

// peer is a configured peer, resolved.
type peer struct {
	Peer
	pin    [32]byte
	rcp    *Recipient
	rec    *enroll.Record // re-checked at every handover
	client *http.Client   // keeps its TLS connections open between calls
}

// Engine is one bridge's side of handovers, as source and as destination.
type Engine struct {
	o       Options
	cert    tls.Certificate
	pin     string
	peers   []*peer
	byPin   map[[32]byte]*peer
	outDir  string
	timeout time.Duration
	roots   *x509.CertPool

	mu      sync.Mutex
	out     map[string]*reservation // source: by uuid
	wake    map[string]chan struct{}
	pending map[string]*pendingIn // destination: by uuid
	inDir   string
}

// reservation is a source's durable promise of a VM to one destination.
type reservation struct {
	UUID    string    `json:"uuid"`
	Name    string    `json:"name"`
	Peer    string    `json:"peer"`
	Nonce   Nonce     `json:"nonce"`
	Created time.Time `json:"created"`
	// Stopped is set when libvirt reported the VM stopped with reason
	// migrated: the handover may be answered.
	Stopped bool `json:"stopped,omitempty"`
	// VPCRs is a vTPM VM's vPCR snapshot, taken when it stopped.
	VPCRs *vpcr.Snapshot `json:"vpcrs,omitempty"`
	// Answer is the handover once made (sealed to the destination's TPM:
	// safe at rest); it is answered again to a retried poll.
	Answer *Handover `json:"answer,omitempty"`
	// ID is the instance id, hex, once handed over.
	ID string `json:"id,omitempty"`
}

// pendingIn is a destination's reservation at a source.
type pendingIn struct {
	peer       *peer
	name       string
	nonce      Nonce
	sourceHost string
}

// pendingFile is a pendingIn at rest (STATE_DIR/migration/in/<uuid>.json):
// a destination bridge that restarts mid-migration still holds its nonce,
// so it can take the handover, or cancel it.
type pendingFile struct {
	UUID       string `json:"uuid"`
	Name       string `json:"name"`
	Peer       string `json:"peer"`
	Nonce      Nonce  `json:"nonce"`
	SourceHost string `json:"source_host"`
	// Domain is the incoming domain XML, once its prepare ran (the
	// daemon's: to reopen its sockets after a restart).
	Domain []byte `json:"domain,omitempty"`
}

// New resolves the peers (each enrolled record re-checked against the EK
// CA), loads the TLS certificate (making it under StateDir if needed) and
// the source's durable reservations.
func New(o Options) (*Engine, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	e := &Engine{o: o, byPin: map[[32]byte]*peer{}, out: map[string]*reservation{}, wake: map[string]chan struct{}{},
		pending: map[string]*pendingIn{}, outDir: filepath.Join(o.StateDir, "migration", "out"), inDir: filepath.Join(o.StateDir, "migration", "in"),
		timeout: o.Config.handoverTimeout()}
	crt, pin, err := o.Config.LoadCert(o.StateDir, o.Host)
	if err != nil {
		return nil, err
	}
	e.cert, e.pin = crt, pin
	var roots *x509.CertPool
	if len(o.Config.Peers) > 0 {
		b, err := os.ReadFile(o.Config.EKCA)
		if err != nil {
			return nil, fmt.Errorf("migration.ek_ca: %w", err)
		}
		if roots, _, err = enroll.ParseCAs(b); err != nil {
			return nil, fmt.Errorf("migration.ek_ca %s: %w", o.Config.EKCA, err)
		}
	}
	e.roots = roots
	for _, p := range o.Config.Peers {
		pin, _ := parsePin(p.TLSSHA256)
		rec, err := enroll.ReadRecord(p.Enrolled)
		if err != nil {
			return nil, fmt.Errorf("migration peer %s: enrolled record: %w (enroll that host: docs/trust.md)", p.Name, err)
		}
		rcp, err := RecipientFromRecord(rec, roots, o.Now())
		if err != nil {
			return nil, fmt.Errorf("migration peer %s: %w", p.Name, err)
		}
		if o.AK != nil && rcp.AK.Equal(o.AK) {
			return nil, fmt.Errorf("migration peer %s: its enrolled record %s is this bridge's own AK", p.Name, p.Enrolled)
		}
		if hex.EncodeToString(pin[:]) == e.pin {
			return nil, fmt.Errorf("migration peer %s: tls_sha256 is this bridge's own certificate", p.Name)
		}
		pp := &peer{Peer: p, pin: pin, rcp: rcp, rec: rec}
		pp.client = &http.Client{Transport: &http.Transport{TLSClientConfig: e.clientTLS(pp), MaxIdleConnsPerHost: 4, IdleConnTimeout: time.Minute}}
		e.peers = append(e.peers, pp)
		e.byPin[pin] = pp
	}
	if err := e.load(); err != nil {
		return nil, err
	}
	if err := e.loadPending(); err != nil {
		return nil, err
	}
	return e, nil
}

// loadPending reads the destination's reservations a previous process
// left; one at a peer no longer configured is dropped.
func (e *Engine) loadPending() error {
	ents, err := os.ReadDir(e.inDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("incoming migrations: %w", err)
	}
	for _, ent := range ents {
		if filepath.Ext(ent.Name()) != ".json" {
			continue
		}
		path := filepath.Join(e.inDir, ent.Name())
		var pf pendingFile
		b, err := os.ReadFile(path)
		if err == nil {
			err = json.Unmarshal(b, &pf)
		}
		if err != nil {
			return fmt.Errorf("incoming migration %s: %w (remove the file to drop it)", path, err)
		}
		var p *peer
		for _, q := range e.peers {
			if q.Name == pf.Peer {
				p = q
			}
		}
		if p == nil {
			e.o.Logger.Warn("incoming migration from a peer no longer configured: dropped", "vm", pf.Name, "peer", pf.Peer)
			os.Remove(path)
			continue
		}
		e.pending[pf.UUID] = &pendingIn{peer: p, name: pf.Name, nonce: pf.Nonce, sourceHost: pf.SourceHost}
	}
	return nil
}

func (e *Engine) savePending(key string, pd *pendingIn, domain []byte) error {
	if err := os.MkdirAll(e.inDir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(pendingFile{UUID: key, Name: pd.name, Peer: pd.peer.Name, Nonce: pd.nonce, SourceHost: pd.sourceHost, Domain: domain})
	if err != nil {
		return err
	}
	return writeFile(filepath.Join(e.inDir, key+".json"), b, 0o600)
}

// PendingVM is an incoming migration a destination holds.
type PendingVM struct {
	UUID   [16]byte
	Name   string
	Source string
	// Domain is the incoming domain XML SetDomain kept, if any.
	Domain []byte
}

// Incoming lists the incoming migrations this bridge holds (after a
// restart: the ones to resume).
func (e *Engine) Incoming() []PendingVM {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []PendingVM
	for key, pd := range e.pending {
		u, err := conceal.ParseUUID(key)
		if err != nil {
			continue
		}
		var pf pendingFile
		if b, err := os.ReadFile(filepath.Join(e.inDir, key+".json")); err == nil {
			json.Unmarshal(b, &pf)
		}
		out = append(out, PendingVM{UUID: u, Name: pd.name, Source: pd.peer.Name, Domain: pf.Domain})
	}
	return out
}

// SetDomain keeps the incoming domain's XML with its reservation, so a
// restarted bridge can reopen its sockets.
func (e *Engine) SetDomain(uuid [16]byte, xml []byte) error {
	key := conceal.FormatUUID(uuid)
	e.mu.Lock()
	defer e.mu.Unlock()
	pd := e.pending[key]
	if pd == nil {
		return fmt.Errorf("VM %s is not an incoming migration here", key)
	}
	return e.savePending(key, pd, xml)
}

// Stats reports the configured peers' names, the VMs reserved here by a
// destination, and the incoming VMs waiting for their handover.
func (e *Engine) Stats() (peers []string, reserved, incoming int) {
	for _, p := range e.peers {
		peers = append(peers, p.Name)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return peers, len(e.out), len(e.pending)
}

// CertSHA256 is the hex sha256 of this bridge's migration certificate: what
// peers put in tls_sha256.
func (e *Engine) CertSHA256() string { return e.pin }

func (e *Engine) load() error {
	ents, err := os.ReadDir(e.outDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("migration reservations: %w", err)
	}
	for _, ent := range ents {
		if filepath.Ext(ent.Name()) != ".json" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(e.outDir, ent.Name()))
		if err != nil {
			return fmt.Errorf("migration reservation: %w", err)
		}
		var r reservation
		if err := json.Unmarshal(b, &r); err != nil {
			return fmt.Errorf("migration reservation %s: %w (remove the file to drop it)", ent.Name(), err)
		}
		e.out[r.UUID] = &r
	}
	return nil
}

func (e *Engine) save(r *reservation) error {
	if err := os.MkdirAll(e.outDir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return writeFile(filepath.Join(e.outDir, r.UUID+".json"), b, 0o600)
}

func (e *Engine) remove(uuid string) error {
	err := os.Remove(filepath.Join(e.outDir, uuid+".json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

// ---- TLS ----

func (e *Engine) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{e.cert},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("tpmmux migration: the peer sent no certificate")
			}
			sum := sha256.Sum256(raw[0])
			if e.byPin[sum] == nil {
				return fmt.Errorf("tpmmux migration: refused a peer whose certificate sha256 %x is not in migration.peers (add it there with its enrolled record to trust it)", sum)
			}
			return nil
		},
	}
}

func (e *Engine) clientTLS(p *peer) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{e.cert},
		InsecureSkipVerify: true, // the pin below is the check
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("the peer sent no certificate")
			}
			if sum := sha256.Sum256(raw[0]); sum != p.pin {
				return fmt.Errorf("peer %s at %s presented certificate sha256 %x, not the tls_sha256 configured for it (%x)", p.Name, p.Address, sum, p.pin)
			}
			return nil
		},
	}
}

// ---- server (source side) ----

// Serve answers peers on l until ctx ends.
func (e *Engine) Serve(ctx context.Context, l net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/reserve", e.handle(e.reserve))
	mux.HandleFunc("POST /v1/handover", e.handle(e.handover))
	mux.HandleFunc("POST /v1/cancel", e.handle(e.cancel))
	mux.HandleFunc("POST /v1/done", e.handle(e.done))
	srv := &http.Server{Handler: mux, TLSConfig: e.serverTLS(), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:    slog.NewLogLogger(e.o.Logger.Handler(), slog.LevelDebug),
		BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	err := srv.ServeTLS(l, "", "")
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// refusal is an answer with an HTTP status.
type refusal struct {
	status int
	msg    string
}

func (r *refusal) Error() string { return r.msg }

func refuse(status int, format string, a ...any) error {
	return &refusal{status: status, msg: fmt.Sprintf(format, a...)}
}

func (e *Engine) handle(fn func(ctx context.Context, p *peer, body []byte) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var p *peer
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			p = e.byPin[sha256.Sum256(r.TLS.PeerCertificates[0].Raw)]
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, maxRequest+1))
		var out any
		switch {
		case p == nil:
			err = refuse(http.StatusForbidden, "unknown peer")
		case err != nil:
		case len(body) > maxRequest:
			err = refuse(http.StatusRequestEntityTooLarge, "request larger than %d bytes", maxRequest)
		default:
			out, err = fn(r.Context(), p, body)
		}
		w.Header().Set("Content-Type", "application/json")
		if err != nil {
			st := http.StatusInternalServerError
			var rf *refusal
			if errors.As(err, &rf) {
				st = rf.status
			}
			name := "?"
			if p != nil {
				name = p.Name
			}
			e.o.Logger.Warn("migration request refused", "peer", name, "path", r.URL.Path, "err", err)
			w.WriteHeader(st)
			json.NewEncoder(w).Encode(errorBody{Error: err.Error()})
			return
		}
		json.NewEncoder(w).Encode(out)
	}
}

func decodeStrict(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return refuse(http.StatusBadRequest, "malformed request: %v", err)
	}
	return nil
}

func (e *Engine) reserve(ctx context.Context, p *peer, body []byte) (any, error) {
	var req ReserveRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	u, err := conceal.ParseUUID(req.UUID)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "uuid: %v", err)
	}
	if req.DestHost != p.Name {
		return nil, refuse(http.StatusForbidden, "reserve names destination %q but the peer's certificate is %q's", req.DestHost, p.Name)
	}
	id, ok := e.o.Mux.Lookup(req.Name)
	var ident *conceal.Identity
	if ok {
		ident, err = e.o.Mux.Identity(id)
	}
	if !ok || err != nil || ident.UUID != u {
		return nil, refuse(http.StatusNotFound, "no live VM %s (uuid %s) on %s", req.Name, req.UUID, e.o.Host)
	}
	key := conceal.FormatUUID(u)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.expireLocked()
	if r := e.out[key]; r != nil {
		if r.Answer != nil && r.ID != hex.EncodeToString(id[:]) {
			// A stale handover of an earlier stay: the VM is live here again.
			delete(e.out, key)
		} else if r.Peer == p.Name && r.Nonce == req.Nonce {
			return ReserveResponse{SourceHost: e.o.Host}, nil // the same request again
		} else {
			return nil, refuse(http.StatusConflict, "VM %s is already reserved for migration to %s since %s: a second destination (%s) would fork its history; cancel the first migration",
				req.Name, r.Peer, r.Created.Format(time.RFC3339), p.Name)
		}
	}
	r := &reservation{UUID: key, Name: req.Name, Peer: p.Name, Nonce: req.Nonce, Created: e.o.Now().UTC()}
	if err := e.save(r); err != nil {
		return nil, fmt.Errorf("store reservation of %s: %w", req.Name, err)
	}
	e.out[key] = r
	e.o.Logger.Info("migration reserved", "vm", req.Name, "dest", p.Name)
	return ReserveResponse{SourceHost: e.o.Host}, nil
}

// reserved returns the reservation of uuid for p and nonce, or a refusal.
// The caller holds e.mu.
func (e *Engine) reservedLocked(p *peer, req *HandoverRequest) (*reservation, error) {
	u, err := conceal.ParseUUID(req.UUID)
	if err != nil {
		return nil, refuse(http.StatusBadRequest, "uuid: %v", err)
	}
	r := e.out[conceal.FormatUUID(u)]
	switch {
	case r == nil:
		return nil, refuse(http.StatusNotFound, "VM %s is not migrating from %s (no reservation)", req.UUID, e.o.Host)
	case r.Peer != p.Name:
		return nil, refuse(http.StatusForbidden, "VM %s is reserved for %s, not %s", r.Name, r.Peer, p.Name)
	case r.Nonce != req.Nonce:
		return nil, refuse(http.StatusForbidden, "VM %s: the nonce is not the reservation's (a replayed or altered request)", r.Name)
	}
	return r, nil
}

func (e *Engine) wakeLocked(key string) chan struct{} {
	ch := e.wake[key]
	if ch == nil {
		ch = make(chan struct{})
		e.wake[key] = ch
	}
	return ch
}

func (e *Engine) handover(ctx context.Context, p *peer, body []byte) (any, error) {
	var req HandoverRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	for {
		e.mu.Lock()
		r, err := e.reservedLocked(p, &req)
		if err != nil {
			e.mu.Unlock()
			return nil, err
		}
		if r.Answer != nil || r.Stopped {
			defer e.mu.Unlock()
			return e.answerLocked(ctx, p, r)
		}
		ch := e.wakeLocked(r.UUID)
		e.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, refuse(http.StatusRequestTimeout, "VM %s has not stopped for migration yet", r.Name)
		case <-ch:
		}
	}
}

// answerLocked makes (once) and returns the handover of r.
func (e *Engine) answerLocked(ctx context.Context, p *peer, r *reservation) (*Handover, error) {
	if r.Answer != nil && r.Answer.Evidence != nil {
		return r.Answer, nil
	}
	if r.Answer != nil {
		// Sealed before a restart (or a failed MigrateOut): MigrateOut
		// again, which for the same destination and nonce returns the same
		// final evidence, or ends the segment now if it had not.
		id, err := hexID(r.ID)
		if err != nil {
			return nil, err
		}
		ev, err := e.o.Mux.MigrateOut(ctx, id, Out{DestHost: p.Name, DestAK: p.rcp.AKFP, Nonce: r.Nonce, Credential: r.Answer.Credential.Digest()})
		if err != nil {
			return nil, fmt.Errorf("migrate out %s: %w", r.Name, err)
		}
		if r.Answer.Evidence, err = ev.MarshalBinary(); err != nil {
			return nil, err
		}
		return r.Answer, nil
	}
	id, ok := e.o.Mux.Lookup(r.Name)
	if !ok {
		return nil, fmt.Errorf("VM %s is no longer live here", r.Name)
	}
	ident, err := e.o.Mux.Identity(id)
	if err != nil {
		return nil, err
	}
	// The destination's enrollment still holds (its EK certificate
	// chains to the EK CA today), before K is wrapped to its TPM.
	if _, err := p.rec.Check(e.roots, e.o.Now()); err != nil {
		return nil, refuse(http.StatusForbidden, "%s's enrollment no longer holds, the VM is not handed to it: %v", p.Name, err)
	}
	pl := payload{Identity: *ident, VPCRs: r.VPCRs}
	cred, secret, err := MakeCredential(p.rcp, nil)
	if err != nil {
		return nil, err
	}
	defer clear(secret)
	b := Binding{UUID: ident.UUID, Nonce: r.Nonce, SourceHost: e.o.Host, DestHost: p.Name, DestAK: p.rcp.AKFP, Credential: cred.Digest()}
	plain, err := json.Marshal(pl)
	if err != nil {
		return nil, err
	}
	sealed, err := Seal(secret, plain, &b)
	clear(plain)
	if err != nil {
		return nil, err
	}
	ans := &Handover{UUID: r.UUID, Nonce: r.Nonce, SourceHost: e.o.Host, DestHost: p.Name, Credential: *cred, Sealed: sealed}
	// Durable before the segment ends here: a restart answers the same
	// sealed identity (only the destination's TPM opens it).
	r.Answer, r.ID = ans, hex.EncodeToString(id[:])
	if err := e.save(r); err != nil {
		r.Answer, r.ID = nil, ""
		return nil, fmt.Errorf("store handover of %s: %w", r.Name, err)
	}
	ev, err := e.o.Mux.MigrateOut(ctx, id, Out{DestHost: p.Name, DestAK: p.rcp.AKFP, Nonce: r.Nonce, Credential: cred.Digest()})
	if err != nil {
		// The sealed answer stays: a retried poll migrates out again.
		return nil, fmt.Errorf("migrate out %s: %w", r.Name, err)
	}
	// The evidence is not stored again: a restarted source takes it from
	// the ended instance (FinalEvidence).
	if ans.Evidence, err = ev.MarshalBinary(); err != nil {
		return nil, err
	}
	e.o.Logger.Info("migration handed over", "vm", r.Name, "dest", p.Name)
	return ans, nil
}

func hexID(s string) (conceal.Digest, error) {
	var id conceal.Digest
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("reservation instance id %q", s)
	}
	copy(id[:], b)
	return id, nil
}

func (e *Engine) cancel(_ context.Context, p *peer, body []byte) (any, error) {
	var req HandoverRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	r, err := e.reservedLocked(p, &req)
	if err != nil {
		return nil, err
	}
	if r.Answer != nil {
		return nil, refuse(http.StatusConflict, "VM %s was already handed over to %s: its segment here has ended; the destination must complete the handover", r.Name, r.Peer)
	}
	return struct{}{}, e.dropLocked(r, "cancelled by the destination")
}

func (e *Engine) done(_ context.Context, p *peer, body []byte) (any, error) {
	var req HandoverRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	r, err := e.reservedLocked(p, &req)
	if err != nil {
		return nil, err
	}
	if r.Answer == nil {
		return nil, refuse(http.StatusConflict, "VM %s has not been handed over", r.Name)
	}
	return struct{}{}, e.dropLocked(r, "handover complete")
}

func (e *Engine) dropLocked(r *reservation, why string) error {
	if err := e.remove(r.UUID); err != nil {
		return fmt.Errorf("remove reservation of %s: %w", r.Name, err)
	}
	delete(e.out, r.UUID)
	if ch := e.wake[r.UUID]; ch != nil {
		close(ch)
		delete(e.wake, r.UUID)
	}
	e.o.Logger.Info("migration reservation dropped", "vm", r.Name, "dest", r.Peer, "why", why)
	return nil
}

// Reserved reports whether the domain name is reserved for a migration
// from this host: its stop is then not a teardown.
func (e *Engine) Reserved(name string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.expireLocked()
	for _, r := range e.out {
		if r.Name == name {
			return true
		}
	}
	return false
}

// expireLocked drops reservations whose VM neither stopped nor was handed
// over within the handover timeout of their making: a destination that
// reserved and went away must not keep the VM's stops taken for a
// migration's. The caller holds e.mu.
func (e *Engine) expireLocked() {
	now := e.o.Now()
	for _, r := range e.out {
		if r.Answer == nil && !r.Stopped && now.Sub(r.Created) > e.timeout {
			if err := e.dropLocked(r, "expired: no handover within "+e.timeout.String()); err != nil {
				e.o.Logger.Warn("drop reservation", "vm", r.Name, "err", err)
			}
		}
	}
}

// SourceStopped is libvirt's "stopped, reason migrated" for domain name on
// the source: the reserved handover may now be answered. It reports
// whether name was reserved.
func (e *Engine) SourceStopped(name string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.expireLocked()
	for _, r := range e.out {
		if r.Name == name && !r.Stopped {
			r.Stopped = true
			if e.o.Snapshot != nil {
				sn, err := e.o.Snapshot(name)
				if err != nil {
					e.o.Logger.Error("vPCR snapshot at migration", "vm", name, "err", err)
				}
				r.VPCRs = sn
			}
			if err := e.save(r); err != nil {
				e.o.Logger.Warn("store reservation", "vm", name, "err", err)
			}
			if ch := e.wake[r.UUID]; ch != nil {
				close(ch)
				delete(e.wake, r.UUID)
			}
			return true
		} else if r.Name == name {
			return true
		}
	}
	return false
}

// SourceResumed is an aborted or failed migration on the source (the VM
// resumes here): its reservation is dropped, unless it was already handed
// over. It reports whether a reservation was dropped.
func (e *Engine) SourceResumed(name string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range e.out {
		if r.Name == name && r.Answer == nil {
			if err := e.dropLocked(r, "migration aborted: the VM resumed on the source"); err != nil {
				e.o.Logger.Warn("drop reservation", "vm", name, "err", err)
			}
			return true
		}
	}
	return false
}

// ---- client (destination side) ----

// RemoteError is a peer's refusal.
type RemoteError struct {
	Peer   string
	Status int
	Msg    string
}

func (r *RemoteError) Error() string { return fmt.Sprintf("%s refused: %s", r.Peer, r.Msg) }

func (e *Engine) call(ctx context.Context, p *peer, path string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, "https://"+p.Address+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	// Every call may be sent again (a reserve with the same nonce, a
	// handover poll, a cancel or done): this lets the client retry one
	// that met a kept-alive connection the peer had closed (a restart).
	hr.Header.Set("Idempotency-Key", path)
	r, err := p.client.Do(hr)
	if err != nil {
		return fmt.Errorf("migration peer %s at %s: %w", p.Name, p.Address, err)
	}
	defer r.Body.Close()
	b, err := io.ReadAll(io.LimitReader(r.Body, maxResponse+1))
	if err != nil {
		return fmt.Errorf("migration peer %s: read answer: %w", p.Name, err)
	}
	if len(b) > maxResponse {
		return fmt.Errorf("migration peer %s: answer larger than %d bytes", p.Name, maxResponse)
	}
	if r.StatusCode != http.StatusOK {
		var eb errorBody
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = r.Status
		}
		return &RemoteError{Peer: p.Name, Status: r.StatusCode, Msg: eb.Error}
	}
	if resp == nil {
		return nil
	}
	if err := json.Unmarshal(b, resp); err != nil {
		return fmt.Errorf("migration peer %s: malformed answer: %w", p.Name, err)
	}
	return nil
}

// Reserve is the destination's "migrate begin": it asks every peer to
// reserve VM uuid (name) for this host and returns the source's host name.
// Exactly one peer must run it.
func (e *Engine) Reserve(ctx context.Context, uuid [16]byte, name string) (string, error) {
	if len(e.peers) == 0 {
		return "", errors.New("no migration peers configured: add the source bridge to migration.peers (docs/migration.md)")
	}
	key := conceal.FormatUUID(uuid)
	var nonce Nonce
	if _, err := rand.Read(nonce[:]); err != nil {
		return "", err
	}
	type res struct {
		p   *peer
		src string
		err error
	}
	// A peer that does not answer must not use up the hook's whole time.
	pctx := ctx
	if dl, ok := ctx.Deadline(); ok {
		var c context.CancelFunc
		pctx, c = context.WithDeadline(ctx, time.Now().Add(time.Until(dl)*4/5))
		defer c()
	}
	ch := make(chan res, len(e.peers))
	for _, p := range e.peers {
		go func() {
			var rr ReserveResponse
			err := e.call(pctx, p, "/v1/reserve", ReserveRequest{UUID: key, Name: name, DestHost: e.o.Host, Nonce: nonce}, &rr)
			ch <- res{p, rr.SourceHost, err}
		}()
	}
	var got []res
	var errs []error
	for range e.peers {
		r := <-ch
		if r.err == nil {
			got = append(got, r)
		} else {
			errs = append(errs, r.err)
		}
	}
	switch {
	case len(got) == 0:
		return "", fmt.Errorf("no peer reserved VM %s for migration here: %w", name, errors.Join(errs...))
	case len(got) > 1:
		for _, g := range got {
			e.call(context.WithoutCancel(ctx), g.p, "/v1/cancel", HandoverRequest{UUID: key, Nonce: nonce}, nil)
		}
		return "", fmt.Errorf("VM %s is live on %d peers (%s, %s): refusing to migrate a forked VM", name, len(got), got[0].p.Name, got[1].p.Name)
	}
	pd := &pendingIn{peer: got[0].p, name: name, nonce: nonce, sourceHost: got[0].src}
	e.mu.Lock()
	old := e.pending[key]
	err := e.savePending(key, pd, nil)
	if err == nil {
		e.pending[key] = pd
	}
	e.mu.Unlock()
	if err != nil {
		e.call(context.WithoutCancel(ctx), pd.peer, "/v1/cancel", HandoverRequest{UUID: key, Nonce: nonce}, nil)
		return "", fmt.Errorf("store the incoming migration of %s: %w", name, err)
	}
	if old != nil {
		e.call(context.WithoutCancel(ctx), old.peer, "/v1/cancel", HandoverRequest{UUID: key, Nonce: old.nonce}, nil)
	}
	return got[0].src, nil
}

// Pending reports whether VM uuid is reserved here as an incoming
// migration (a destination's prepare then makes no new identity).
func (e *Engine) Pending(uuid [16]byte) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pending[conceal.FormatUUID(uuid)] != nil
}

// Receive waits for the handover of the reserved VM uuid, activates its
// credential on this host's TPM, opens the identity and verifies the
// source's chain evidence against the source's enrolled AK. The caller
// then calls mux.MigrateIn and Done; on failure, Cancel.
func (e *Engine) Receive(ctx context.Context, uuid [16]byte) (*Arrival, error) {
	key := conceal.FormatUUID(uuid)
	e.mu.Lock()
	pd := e.pending[key]
	e.mu.Unlock()
	if pd == nil {
		return nil, fmt.Errorf("VM %s is not an incoming migration here (no reservation: the migrate begin hook did not run or failed)", key)
	}
	ctx, cancel := context.WithTimeout(ctx, e.timeout)
	defer cancel()
	var h Handover
	// A source that restarts (or a network that drops the long poll) is
	// waited for: only its refusal, or the handover timeout, ends the wait.
	for delay := 250 * time.Millisecond; ; delay = min(2*delay, 5*time.Second) {
		err := e.call(ctx, pd.peer, "/v1/handover", HandoverRequest{UUID: key, Nonce: pd.nonce}, &h)
		var re *RemoteError
		switch {
		case err == nil:
		case errors.As(err, &re) && re.Status != http.StatusRequestTimeout:
			return nil, fmt.Errorf("handover of %s: %w", pd.name, err)
		case ctx.Err() != nil:
			return nil, fmt.Errorf("handover of %s: no handover from %s within %s: %w", pd.name, pd.peer.Name, e.timeout, err)
		default:
			e.o.Logger.Warn("migration: waiting for the handover again", "vm", pd.name, "source", pd.peer.Name, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(delay):
			}
			continue
		}
		break
	}
	return e.open(ctx, pd, uuid, &h)
}

// open checks and opens a handover answered for pd.
func (e *Engine) open(ctx context.Context, pd *pendingIn, uuid [16]byte, h *Handover) (*Arrival, error) {
	p := pd.peer
	if h.UUID != conceal.FormatUUID(uuid) || h.Nonce != pd.nonce || h.DestHost != e.o.Host || h.SourceHost != p.Name {
		return nil, fmt.Errorf("handover of %s from %s is for another VM, nonce or host (uuid %s, dest %q, source %q): replayed or altered", pd.name, p.Name, h.UUID, h.DestHost, h.SourceHost)
	}
	if e.o.TPM == nil {
		return nil, errors.New("this bridge has no TPM to activate a handover")
	}
	secret, err := e.o.TPM.ActivateCredential(ctx, tpm.EKKind(h.Credential.EKKind), h.Credential.Blob, h.Credential.EncryptedSecret)
	if err != nil {
		return nil, fmt.Errorf("handover of %s: this host's TPM does not activate its credential (made for another host?): %w", pd.name, err)
	}
	defer clear(secret)
	myAK := [32]byte{}
	if e.o.AK != nil {
		myAK = akFP(e.o.AK)
	}
	b := Binding{UUID: uuid, Nonce: pd.nonce, SourceHost: p.Name, DestHost: e.o.Host, DestAK: myAK, Credential: h.Credential.Digest()}
	plain, err := Open(secret, h.Sealed, &b)
	if err != nil {
		return nil, fmt.Errorf("handover of %s from %s: %w", pd.name, p.Name, err)
	}
	defer clear(plain)
	var pl payload
	if err := json.Unmarshal(plain, &pl); err != nil {
		return nil, fmt.Errorf("handover of %s: sealed payload: %w", pd.name, err)
	}
	if pl.Identity.UUID != uuid {
		return nil, fmt.Errorf("handover of %s: the sealed identity is of VM %s", pd.name, conceal.FormatUUID(pl.Identity.UUID))
	}
	ev, err := evidence.Decode(h.Evidence)
	if err != nil {
		return nil, fmt.Errorf("handover of %s: chain evidence: %w", pd.name, err)
	}
	out := Out{DestHost: e.o.Host, DestAK: myAK, Nonce: pd.nonce, Credential: h.Credential.Digest()}
	verifyChain := e.o.VerifyChain
	if verifyChain == nil {
		verifyChain = VerifyChain
	}
	if err := verifyChain(ev, &pl.Identity, p.rcp.AK, e.trusted(), out); err != nil {
		return nil, fmt.Errorf("handover of %s: the source's chain evidence does not verify against %s's enrolled AK: %w", pd.name, p.Name, err)
	}
	ident := pl.Identity
	return &Arrival{Identity: &ident, Name: pd.name, SourceHost: p.Name, SourceAK: p.rcp.AK, Chain: ev, VPCRs: pl.VPCRs, Nonce: pd.nonce, Credential: out.Credential}, nil
}

// Done tells the source the handover of uuid completed (after MigrateIn)
// and forgets it here: a replayed handover is then refused.
func (e *Engine) Done(ctx context.Context, uuid [16]byte) error {
	return e.finish(ctx, uuid, "/v1/done")
}

// Cancel gives up the incoming migration of uuid: the source drops its
// reservation (unless it already handed the VM over) and this host forgets
// it. Nothing of the VM's identity is kept here.
func (e *Engine) Cancel(ctx context.Context, uuid [16]byte) error {
	return e.finish(ctx, uuid, "/v1/cancel")
}

func (e *Engine) finish(ctx context.Context, uuid [16]byte, path string) error {
	key := conceal.FormatUUID(uuid)
	e.mu.Lock()
	pd := e.pending[key]
	delete(e.pending, key)
	if err := os.Remove(filepath.Join(e.inDir, key+".json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		e.o.Logger.Warn("remove incoming migration file", "vm", key, "err", err)
	}
	e.mu.Unlock()
	if pd == nil {
		return nil
	}
	return e.call(ctx, pd.peer, path, HandoverRequest{UUID: key, Nonce: pd.nonce}, nil)
}

// trusted are the AKs a chain's earlier segments may be signed by: this
// host's and every peer's.
func (e *Engine) trusted() []*ecdsa.PublicKey {
	var out []*ecdsa.PublicKey
	if e.o.AK != nil {
		out = append(out, e.o.AK)
	}
	for _, p := range e.peers {
		out = append(out, p.rcp.AK)
	}
	return out
}

func akFP(ak *ecdsa.PublicKey) [32]byte {
	der, err := x509.MarshalPKIXPublicKey(ak)
	if err != nil {
		return [32]byte{}
	}
	return sha256.Sum256(der)
}
