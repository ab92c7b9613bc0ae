package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/evidence"
)

// Handler carries out control requests. Its methods get a context that
// ends at the earlier of the server's timeout and the client's deadline.
type Handler interface {
	// Prepare gives a starting domain its identity and opens its
	// listeners (libvirt's "prepare begin").
	Prepare(ctx context.Context, xml []byte, failOpen bool) (*VM, error)
	// Started handles "started begin" with the live domain XML.
	Started(ctx context.Context, name string, xml []byte) (*VM, error)
	// Stopped handles "stopped end".
	Stopped(ctx context.Context, name, reason string) error
	// Release handles "release end".
	Release(ctx context.Context, name, reason string) error
	// Reconnect re-adopts a running domain after libvirtd restarted
	// ("reconnect begin").
	Reconnect(ctx context.Context, xml []byte) (*VM, error)
	// Status reports the bridge's state.
	Status(ctx context.Context) (*Status, error)
	// VMs lists the live VM instances (all: ended ones too).
	VMs(ctx context.Context, all bool) ([]VM, error)
	// Evidence returns evidence for the VM named vm with the nonce.
	Evidence(ctx context.Context, vm string, nonce []byte) (*Evidence, error)
}

// EvidenceWriter is implemented by a Handler that serves evidence, full or
// since a checkpoint, of any size: it calls write once with the response's
// fields and, for evidence it streams, body, which produces the evidence's
// bytes piece by piece (mux.StreamEvidence); the server writes the JSON
// response as they come, base64 streamed, so neither side holds the whole
// evidence in memory more than once. With body nil, e.Evidence is the
// evidence. The server prefers it to Handler.Evidence; without it, a request
// with Since is refused.
type EvidenceWriter interface {
	WriteEvidence(ctx context.Context, vm string, nonce []byte, since *evidence.Since, write func(e *Evidence, body func(emit func([]byte) error) error) error) error
}

// Undoer is implemented by a Handler that can undo a prepare whose answer
// never reached a fail-closed client: the client gave up, so libvirt
// aborts the start, and the identity would otherwise stay live.
type Undoer interface {
	UndoPrepare(ctx context.Context, vm *VM, cause error)
}

// Server defaults.
const (
	DefaultTimeout     = 30 * time.Second
	DefaultReadTimeout = 5 * time.Second
	DefaultMaxConns    = 64
)

// Server serves control requests on unix listeners.
type Server struct {
	Handler Handler
	Log     *slog.Logger
	// Timeout bounds one exchange (default DefaultTimeout).
	Timeout time.Duration
	// ReadTimeout bounds reading the request (default DefaultReadTimeout).
	ReadTimeout time.Duration
	// AllowUID decides which peer users may make requests; nil allows
	// root only.
	AllowUID func(uid uint32) bool
	// MaxConns bounds the connections served at once (default
	// DefaultMaxConns); more wait in the listen backlog.
	MaxConns int

	mu        sync.Mutex
	listeners []net.Listener
	closed    bool
	wg        sync.WaitGroup
	sem       chan struct{}
	once      sync.Once
}

// Listen creates the control socket at path: its directory (0755) if
// missing, the socket with mode 0600, owned by root when the process is
// root. A stale socket of an earlier bridge is replaced; a live one (a
// bridge that answers) is an error.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, 500*time.Millisecond); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another tpmmux-bridge is listening on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(true)
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket %s: chmod: %w", path, err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(path, 0, 0); err != nil {
			l.Close()
			return nil, fmt.Errorf("control socket %s: chown: %w", path, err)
		}
	}
	return l, nil
}

func (s *Server) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

func (s *Server) init() {
	s.once.Do(func() {
		n := s.MaxConns
		if n <= 0 {
			n = DefaultMaxConns
		}
		s.sem = make(chan struct{}, n)
	})
}

// Serve accepts connections on l until l is closed or Close is called.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	s.listeners = append(s.listeners, l)
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			s.log().Error("control socket: accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		s.sem <- struct{}{}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			<-s.sem
			c.Close()
			return nil
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			s.serveConn(c)
		}()
	}
}

// Close stops accepting and waits for the requests in progress.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	ls := s.listeners
	s.listeners = nil
	s.mu.Unlock()
	for _, l := range ls {
		l.Close()
	}
	s.wg.Wait()
	return nil
}

// PeerUID returns the uid of the process at the other end of a unix
// socket connection (SO_PEERCRED: the credentials it had when it
// connected).
func PeerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, errors.New("not a unix socket connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred.Uid, nil
}

func (s *Server) allowed(uid uint32) bool {
	if s.AllowUID != nil {
		return s.AllowUID(uid)
	}
	return uid == 0
}

func (s *Server) serveConn(c net.Conn) {
	defer c.Close()
	timeout := s.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	readTimeout := s.ReadTimeout
	if readTimeout <= 0 {
		readTimeout = DefaultReadTimeout
	}
	start := time.Now()
	c.SetDeadline(start.Add(timeout))
	uid, err := PeerUID(c)
	if err != nil {
		s.log().Warn("control socket: refused a connection: no peer credentials", "err", err)
		s.reply(c, &Response{Error: "permission denied: no peer credentials"})
		return
	}
	if !s.allowed(uid) {
		s.log().Warn("control socket: refused a connection from a non-root peer", "uid", uid)
		s.reply(c, &Response{Error: fmt.Sprintf("permission denied: peer uid %d is not root", uid)})
		return
	}
	c.SetReadDeadline(start.Add(min(readTimeout, timeout)))
	var req Request
	dec := json.NewDecoder(io.LimitReader(c, MaxRequest))
	if err := dec.Decode(&req); err != nil {
		s.log().Warn("control socket: bad request", "err", err)
		s.reply(c, &Response{Error: fmt.Sprintf("bad request: %v", err)})
		return
	}
	deadline := start.Add(timeout)
	if !req.Deadline.IsZero() && req.Deadline.Before(deadline) {
		deadline = req.Deadline
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	// Give the answer a moment past the client's deadline: a client whose
	// deadline passed has gone, and then the write fails.
	c.SetWriteDeadline(deadline.Add(100 * time.Millisecond))
	var resp *Response
	var werr error
	if ew, ok := s.Handler.(EvidenceWriter); ok && req.Op == OpEvidence {
		resp, werr = s.writeEvidence(ctx, c, ew, &req)
	} else {
		resp = s.dispatch(ctx, &req)
		werr = s.reply(c, resp)
	}
	level := slog.LevelInfo
	if req.Op == OpStatus || req.Op == OpVMs {
		level = slog.LevelDebug
	}
	attrs := []any{"op", req.Op, "elapsed", time.Since(start).Round(time.Microsecond)}
	if n := req.Name + req.VM; n != "" {
		attrs = append(attrs, "vm", n)
	} else if resp.VM != nil {
		attrs = append(attrs, "vm", resp.VM.Name)
	}
	if resp.Error != "" {
		attrs = append(attrs, "err", resp.Error)
		level = slog.LevelWarn
	}
	s.log().Log(ctx, level, "control request", attrs...)
	if werr != nil && req.Op == OpPrepare && resp.Error == "" && resp.VM != nil && !resp.VM.Skipped && !req.FailOpen {
		if u, ok := s.Handler.(Undoer); ok {
			uctx, ucancel := context.WithTimeout(context.Background(), timeout)
			u.UndoPrepare(uctx, resp.VM, werr)
			ucancel()
		}
	}
}

// writeEvidence serves an evidence request through an EvidenceWriter. It
// returns the response for the log (without its evidence bytes).
func (s *Server) writeEvidence(ctx context.Context, c net.Conn, ew EvidenceWriter, req *Request) (resp *Response, werr error) {
	started := false
	err := func() (err error) {
		defer func() {
			if r := recover(); r != nil {
				s.log().Error("control request panicked", "op", req.Op, "panic", r)
				err = fmt.Errorf("internal error: %v", r)
			}
		}()
		return ew.WriteEvidence(ctx, req.VM, req.Nonce, req.Since, func(e *Evidence, body func(emit func([]byte) error) error) error {
			resp = &Response{Evidence: &Evidence{VM: e.VM, PostMortem: e.PostMortem}}
			return writeEvidenceJSON(c, e, body, &started)
		})
	}()
	if started {
		// The response is under way: an error now can only cut it short,
		// which the client sees as a broken response.
		return resp, err
	}
	if err == nil {
		err = errors.New("evidence: the handler wrote nothing")
	}
	resp = &Response{Error: err.Error()}
	return resp, s.reply(c, resp)
}

// writeEvidenceJSON writes {"evidence": e} as one line of JSON, exactly as
// encodeJSON would, streaming the evidence's base64 from body (or from
// e.Evidence when body is nil) instead of building the response in memory.
// Nothing is written before body's first piece, so an error before it
// (a failed quote) can still be answered as an error; started says whether
// writing began.
func writeEvidenceJSON(w io.Writer, e *Evidence, body func(emit func([]byte) error) error, started *bool) error {
	if body == nil {
		raw := e.Evidence
		body = func(emit func([]byte) error) error { return emit(raw) }
	}
	shell := *e
	shell.Evidence = nil
	b, err := encodeJSON(&Response{Evidence: &shell})
	if err != nil {
		return err
	}
	// A JSON string escapes every quote, so this key-value pair can only be
	// the field itself.
	const hole = `"evidence":null`
	i := bytes.Index(b, []byte(hole))
	if i < 0 {
		return errors.New("encode evidence response: no evidence field")
	}
	bw := bufio.NewWriterSize(w, 64<<10)
	enc := base64.NewEncoder(base64.StdEncoding, bw)
	begin := func() {
		if !*started {
			*started = true
			bw.Write(b[:i])
			bw.WriteString(`"evidence":"`)
		}
	}
	err = body(func(p []byte) error {
		begin()
		_, err := enc.Write(p)
		return err
	})
	if err != nil {
		if *started {
			bw.Flush()
		}
		return err
	}
	begin()
	enc.Close()
	bw.WriteString(`"`)
	bw.Write(b[i+len(hole):])
	return bw.Flush()
}

func (s *Server) reply(c net.Conn, resp *Response) error {
	b, err := encodeJSON(resp)
	if err != nil {
		b, _ = encodeJSON(&Response{Error: fmt.Sprintf("encode response: %v", err)})
	}
	_, err = c.Write(b)
	return err
}

func (s *Server) dispatch(ctx context.Context, req *Request) (resp *Response) {
	resp = &Response{}
	defer func() {
		if r := recover(); r != nil {
			s.log().Error("control request panicked", "op", req.Op, "panic", r)
			resp = &Response{Error: fmt.Sprintf("internal error: %v", r)}
		}
	}()
	var err error
	h := s.Handler
	switch req.Op {
	case OpPrepare:
		resp.VM, err = h.Prepare(ctx, []byte(req.XML), req.FailOpen)
	case OpStarted:
		resp.VM, err = h.Started(ctx, req.Name, []byte(req.XML))
	case OpStopped:
		err = h.Stopped(ctx, req.Name, req.Reason)
	case OpRelease:
		err = h.Release(ctx, req.Name, req.Reason)
	case OpReconnect:
		resp.VM, err = h.Reconnect(ctx, []byte(req.XML))
	case OpStatus:
		resp.Status, err = h.Status(ctx)
	case OpVMs:
		resp.VMs, err = h.VMs(ctx, req.All)
		if err == nil && resp.VMs == nil {
			resp.VMs = []VM{}
		}
	case OpEvidence:
		if req.Since != nil {
			err = errors.New("evidence: this bridge does not serve incremental evidence; ask for full evidence")
			break
		}
		resp.Evidence, err = h.Evidence(ctx, req.VM, req.Nonce)
	default:
		err = s.dispatchExt(ctx, req, resp)
	}
	if err != nil {
		return &Response{Error: err.Error()}
	}
	return resp
}
