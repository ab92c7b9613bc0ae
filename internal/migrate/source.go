package migrate

// The source's side of a handover: the peer listener, reservations, and the
// answer that ends the VM's segment here.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

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
