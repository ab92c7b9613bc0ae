package migrate

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
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
