package migrate

// The destination's side of a handover: reserve at the source, wait for
// the answer, open and verify it.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/tpm"
)

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
	var asked []*peer
	for _, p := range e.peers {
		if p.Address != "" {
			asked = append(asked, p)
		}
	}
	if len(asked) == 0 {
		return "", errors.New("no migration peer has an address to reserve at: give the source bridge's migration.listen as its address (docs/migration.md)")
	}
	ch := make(chan res, len(asked))
	for _, p := range asked {
		go func() {
			var rr ReserveResponse
			err := e.call(pctx, p, "/v1/reserve", ReserveRequest{UUID: key, Name: name, DestHost: e.o.Host, Nonce: nonce}, &rr)
			ch <- res{p, rr.SourceHost, err}
		}()
	}
	var got []res
	var errs []error
	for range asked {
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
