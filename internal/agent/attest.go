package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// MaxNonce is the longest nonce the bridge accepts, in bytes.
const MaxNonce = 64

// MaxPurpose is the longest binding purpose the bridge accepts, in bytes.
const MaxPurpose = 64

func checkNonce(nonce []byte) error {
	if len(nonce) == 0 || len(nonce) > MaxNonce {
		return fmt.Errorf("nonce of %d bytes, want 1 to %d", len(nonce), MaxNonce)
	}
	return nil
}

// Attest asks the bridge for this VM's evidence for nonce (1 to MaxNonce
// bytes). Over vsock and unix it opens a separate connection that starts
// with the evidence request; the bridge serves it beside the stream
// session. Over virtio-serial the port is the only channel and only one
// process can hold it: while Run runs, the request travels on Run's
// session; otherwise Attest opens the port itself.
func (a *Agent) Attest(ctx context.Context, nonce []byte) (*wire.EvidenceResponse, error) {
	return a.AttestWith(ctx, nonce, AttestOptions{})
}

// AttestOptions are the options of an evidence request.
type AttestOptions struct {
	// Since, for a verifier that holds a checkpoint
	// (verify.Checkpoint.Since), asks only for the batches and records
	// after it, so the answer stays small however long the host's log
	// grows; nil asks for full evidence.
	Since *wire.Since
	// Early asks the bridge for the evidence's end while it takes a quote
	// it shares with other requests (wire.EvidenceRequest.Early): when many
	// verifiers attest a host's VMs at once, the log travels during the
	// quote instead of after it. A bridge older than the field refuses the
	// request (docs/protocol.md, Early evidence).
	Early bool
}

// AttestWith is Attest with options. Evidence larger than one frame, or
// sent early, arrives in parts and is joined here.
func (a *Agent) AttestWith(ctx context.Context, nonce []byte, opts AttestOptions) (*wire.EvidenceResponse, error) {
	if err := checkNonce(nonce); err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	if a.resync() && a.running.Load() {
		resp, err := a.onSession(ctx, &request{typ: wire.TypeEvidenceRequest, nonce: nonce, since: opts.Since, early: opts.Early})
		if err != nil {
			return nil, fmt.Errorf("attest over the running session: %w", err)
		}
		return resp, nil
	}
	conn, err := a.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	defer conn.Close()
	resp, err := attestOn(ctx, conn, a.resync(), a.nextID(), nonce, opts, a.cfg.WriteTimeout)
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	return resp, nil
}

// Bind asks the bridge to record a binding of keyHash (the SHA-256 of a
// public key the guest uses, e.g. its TLS key) for purpose in this VM's
// log, and waits until the binding is durable. It needs a running agent:
// the bridge takes bindings on the stream session only.
func (a *Agent) Bind(ctx context.Context, purpose string, keyHash [32]byte) error {
	if purpose == "" || len(purpose) > MaxPurpose {
		return fmt.Errorf("bind: purpose of %d bytes, want 1 to %d", len(purpose), MaxPurpose)
	}
	if !a.running.Load() {
		return fmt.Errorf("bind: %w", ErrNotRunning)
	}
	if _, err := a.onSession(ctx, &request{typ: wire.TypeBind, purpose: purpose, keyHash: keyHash}); err != nil {
		return fmt.Errorf("bind: %w", err)
	}
	return nil
}

// onSession hands r to Run's session and waits for its answer.
func (a *Agent) onSession(ctx context.Context, r *request) (*wire.EvidenceResponse, error) {
	r.ctx = ctx
	r.done = make(chan result, 1)
	select {
	case a.reqs <- r:
	case <-ctx.Done():
		return nil, fmt.Errorf("no session with the bridge: %w", ctx.Err())
	}
	select {
	case res := <-r.done:
		return res.resp, res.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// attestOn sends one evidence request on a fresh stream and waits for its
// answer, skipping anything else (on virtio-serial, frames of an earlier
// session may still be in the stream).
func attestOn(ctx context.Context, conn Stream, resync bool, id uint64, nonce []byte, opts AttestOptions, writeTimeout time.Duration) (*wire.EvidenceResponse, error) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if d, ok := conn.(deadliner); ok {
		d.SetWriteDeadline(time.Now().Add(writeTimeout))
	}
	wc := wire.NewConn(conn, resync)
	if err := wc.Send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: id, Nonce: nonce, Since: opts.Since, Early: opts.Early}); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	var parts wire.Assembler
	for {
		f, err := wc.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("wait for evidence: %w", err)
		}
		switch f.Type {
		case wire.TypeEvidenceResponse:
			var m wire.EvidenceResponse
			if err := wire.Decode(f, &m); err != nil {
				return nil, err
			}
			if m.ID == id {
				whole, err := parts.Add(&m)
				if err != nil {
					return nil, fmt.Errorf("evidence from the bridge: %w", err)
				}
				if whole != nil {
					return whole, nil
				}
			}
		case wire.TypeError:
			var e wire.Error
			if err := wire.Decode(f, &e); err != nil {
				return nil, err
			}
			if e.Seq == id || e.Fatal {
				return nil, &e
			}
		}
	}
}

// AttestControl asks the agent running on this guest, through its control
// socket at path, for this VM's evidence for nonce.
func AttestControl(ctx context.Context, path string, nonce []byte) (*wire.EvidenceResponse, error) {
	return AttestControlWith(ctx, path, nonce, AttestOptions{})
}

// AttestControlWith is AttestControl with options (the running agent asks
// the bridge with them).
func AttestControlWith(ctx context.Context, path string, nonce []byte, opts AttestOptions) (*wire.EvidenceResponse, error) {
	if err := checkNonce(nonce); err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	conn, err := transport.DialUnix(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("attest through the agent: %w", err)
	}
	defer conn.Close()
	resp, err := attestOn(ctx, conn, false, rand.Uint64(), nonce, opts, DefaultWriteTimeout)
	if err != nil {
		return nil, fmt.Errorf("attest through the agent at %s: %w", path, err)
	}
	return resp, nil
}

// BindControl asks the agent running on this guest, through its control
// socket at path, to bind keyHash for purpose (see Agent.Bind).
func BindControl(ctx context.Context, path, purpose string, keyHash [32]byte) error {
	conn, err := transport.DialUnix(ctx, path)
	if err != nil {
		return fmt.Errorf("bind through the agent: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	wc := wire.NewConn(conn, false)
	seq := rand.Uint64()
	if err := wc.Send(wire.TypeBind, &wire.Bind{Seq: seq, Purpose: purpose, KeyHash: keyHash}); err != nil {
		return fmt.Errorf("bind through the agent: %w", err)
	}
	for {
		f, err := wc.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("bind through the agent: %w", err)
		}
		switch f.Type {
		case wire.TypeAck:
			var m wire.Ack
			if err := wire.Decode(f, &m); err == nil && m.Seq == seq {
				return nil
			}
		case wire.TypeError:
			var e wire.Error
			if err := wire.Decode(f, &e); err != nil {
				return err
			}
			return fmt.Errorf("bind through the agent: %w", &e)
		}
	}
}

// NoAgent reports whether err says that no agent listens on a control
// socket (the socket is missing or refuses connections), so a caller can
// ask the bridge directly instead.
func NoAgent(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
}

// AttestAny asks the running agent through cfg.ControlSocket when one
// answers there, and otherwise the bridge directly over cfg's transport. It
// returns how it got the evidence ("control" or the transport's name).
func AttestAny(ctx context.Context, cfg Config, nonce []byte) (*wire.EvidenceResponse, string, error) {
	return AttestAnyWith(ctx, cfg, nonce, AttestOptions{})
}

// AttestAnyWith is AttestAny with options.
func AttestAnyWith(ctx context.Context, cfg Config, nonce []byte, opts AttestOptions) (*wire.EvidenceResponse, string, error) {
	if cfg.ControlSocket != "" {
		resp, err := AttestControlWith(ctx, cfg.ControlSocket, nonce, opts)
		if err == nil {
			return resp, "control", nil
		}
		if !NoAgent(err) {
			return nil, "control", err
		}
	}
	cfg.ControlSocket = ""
	a, err := New(cfg)
	if err != nil {
		return nil, "", err
	}
	resp, err := a.AttestWith(ctx, nonce, opts)
	return resp, string(a.cfg.Transport), err
}

// listenControl opens the control socket at path, mode 0600 (the evidence
// response carries the VM's secret key), creating its directory (0700) if
// needed. A stale socket is replaced; one
// that another agent answers on is not.
func listenControl(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another agent answers there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket %s: chmod: %w", path, err)
	}
	return l, nil
}

// controlTimeout bounds one request on the control socket.
const controlTimeout = 2 * time.Minute

// serveControl answers local requests on l until ctx is done: an evidence
// request (answered with the evidence or an Error whose Seq is the
// request's ID), a bind (an Ack or an Error) and Ping.
func (a *Agent) serveControl(ctx context.Context, l net.Listener) {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() == nil {
				a.log.Warn("control socket closed", "err", err)
			}
			return
		}
		wg.Add(1)
		go func() { defer wg.Done(); a.controlConn(ctx, c) }()
	}
}

func (a *Agent) controlConn(ctx context.Context, c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	wc := wire.NewConn(c, false)
	for {
		c.SetDeadline(time.Now().Add(controlTimeout))
		f, err := wc.Recv()
		if err != nil {
			return
		}
		rctx, cancel := context.WithTimeout(ctx, controlTimeout)
		err = a.control(rctx, wc, f)
		cancel()
		if err != nil {
			a.log.Warn("control request", "err", err)
			return
		}
	}
}

// control answers one local request.
func (a *Agent) control(ctx context.Context, wc *wire.Conn, f wire.Frame) error {
	fail := func(seq uint64, code string, err error) error {
		var be *wire.Error
		if errors.As(err, &be) {
			code = be.Code
		}
		return wc.Send(wire.TypeError, &wire.Error{Code: code, Message: err.Error(), Seq: seq})
	}
	switch f.Type {
	case wire.TypeEvidenceRequest:
		var m wire.EvidenceRequest
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		resp, err := a.AttestWith(ctx, m.Nonce, AttestOptions{Since: m.Since, Early: m.Early})
		if err != nil {
			return fail(m.ID, wire.CodeEvidence, err)
		}
		out := *resp
		out.ID = m.ID
		for _, p := range wire.EvidenceParts(&out, wire.EvidenceChunk) {
			if err := wc.Send(wire.TypeEvidenceResponse, p); err != nil {
				return err
			}
		}
		return nil
	case wire.TypeBind:
		var m wire.Bind
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		if err := a.Bind(ctx, m.Purpose, m.KeyHash); err != nil {
			return fail(m.Seq, wire.CodeUnavailable, err)
		}
		return wc.Send(wire.TypeAck, &wire.Ack{Seq: m.Seq})
	case wire.TypePing:
		var m wire.Ping
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		return wc.Send(wire.TypePong, &wire.Pong{Seq: m.Seq})
	default:
		wc.Send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: fmt.Sprintf("unexpected %s frame", f.Type), Fatal: true})
		return fmt.Errorf("unexpected %s frame on the control socket", f.Type)
	}
}
