package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tpmmux/tpmmux/internal/wire"
)

// request is something a caller asks the running session to do on the
// stream: an evidence request (on virtio-serial, where the stream is the
// only channel) or a key binding.
type request struct {
	ctx     context.Context
	typ     wire.Type // TypeEvidenceRequest or TypeBind
	nonce   []byte
	since   *wire.Since // evidence since a verifier checkpoint; nil: full
	early   bool        // ask for the evidence's end during the quote
	parts   wire.Assembler
	purpose string
	keyHash [32]byte
	done    chan result // buffered: the session never blocks on it
}

type result struct {
	resp *wire.EvidenceResponse
	err  error
}

func (r *request) finish(resp *wire.EvidenceResponse, err error) {
	select {
	case r.done <- result{resp, err}:
	default:
	}
}

func failAll(rs []*request, err error) {
	for _, r := range rs {
		r.finish(nil, fmt.Errorf("agent: %w", err))
	}
}

// inflight is a frame sent and not yet acknowledged.
type inflight struct {
	seq  uint64
	next uint64    // the log index after the frame's entries
	sent time.Time // when it was sent
	bind *request  // a Bind frame's requester
}

// session is one connection's protocol run.
type session struct {
	a      *Agent
	conn   Stream
	src    *source
	bootID string
	bo     *backoff
	// carry are requests taken by an earlier session and not answered;
	// evidence requests are sent again on this one.
	carry []*request

	wc      *wire.Conn
	queue   []inflight
	waiting map[uint64]*request // evidence requests by ID
}

// deadliner is a stream whose writes can be bounded.
type deadliner interface {
	SetWriteDeadline(time.Time) error
}

// send writes one message, bounded by the write timeout.
func (s *session) send(t wire.Type, m any) error {
	if d, ok := s.conn.(deadliner); ok {
		d.SetWriteDeadline(time.Now().Add(s.a.cfg.WriteTimeout))
	}
	return s.wc.Send(t, m)
}

// leftover returns the evidence requests this session did not answer (to
// carry to the next one); binds it did not finish fail, since sending one
// again could record it twice.
func (s *session) leftover() []*request {
	var out []*request
	for _, r := range s.carry {
		if r.ctx.Err() == nil {
			out = append(out, r)
		}
	}
	for _, r := range s.waiting {
		if r.ctx.Err() == nil {
			out = append(out, r)
		}
	}
	for _, f := range s.queue {
		if f.bind != nil {
			f.bind.finish(nil, errors.New("agent: connection to the bridge lost before the binding was acknowledged"))
		}
	}
	return out
}

// run says hello, waits for Welcome and streams from its resume point
// until the connection fails or ctx is done.
func (s *session) run(ctx context.Context) error {
	a := s.a
	resync := a.resync()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.wc = wire.NewConn(s.conn, resync)
	s.waiting = make(map[uint64]*request)

	frames := make(chan wire.Frame, 16)
	rerr := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			f, err := s.wc.Recv()
			if err != nil {
				rerr <- err
				return
			}
			select {
			case frames <- f:
			case <-ctx.Done():
				return
			}
		}
	}()
	// Closing the stream unblocks the reader and any pending write; the
	// cancel unblocks a reader waiting to hand over a frame.
	stop := context.AfterFunc(ctx, func() { s.conn.Close() })
	defer func() {
		cancel()
		stop()
		s.conn.Close()
		wg.Wait()
	}()

	hello := &wire.Hello{Proto: wire.Version, AgentVersion: a.cfg.AgentVersion, BootID: s.bootID, Have: s.src.known}
	if err := s.send(wire.TypeHello, hello); err != nil {
		return err
	}
	w, err := s.welcome(ctx, frames, rerr)
	if err != nil {
		return err
	}
	s.bo.reset()
	if err := s.src.seek(w.Resume); err != nil {
		return err
	}
	if w.Resume > s.src.known {
		a.log.Warn("the bridge resumes past the end of this guest's list; waiting for the list to grow", "resume", w.Resume, "have", s.src.known)
	}
	a.log.Info("streaming to the bridge", "vm", w.VM, "resume", w.Resume, "have", s.src.known, "window", w.Window)
	return s.stream(ctx, w, frames, rerr)
}

// welcome waits for the bridge's answer to Hello. On a resynchronizing
// stream, frames of an earlier session may come first: they are skipped.
func (s *session) welcome(ctx context.Context, frames <-chan wire.Frame, rerr <-chan error) (wire.Welcome, error) {
	t := time.NewTimer(s.a.cfg.PingTimeout)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return wire.Welcome{}, ctx.Err()
		case err := <-rerr:
			return wire.Welcome{}, fmt.Errorf("wait for welcome: %w", err)
		case <-t.C:
			return wire.Welcome{}, fmt.Errorf("no welcome from the bridge within %v", s.a.cfg.PingTimeout)
		case f := <-frames:
			switch f.Type {
			case wire.TypeWelcome:
				var w wire.Welcome
				if err := wire.Decode(f, &w); err != nil {
					return w, err
				}
				return w, nil
			case wire.TypeError:
				var e wire.Error
				if err := wire.Decode(f, &e); err != nil {
					return wire.Welcome{}, err
				}
				if e.Fatal {
					return wire.Welcome{}, bridgeError(&e)
				}
				if e.Code == wire.CodeHello {
					// Meant for the session before this one: this one
					// says hello already.
					s.a.log.Debug("bridge asked for a hello before welcome", "msg", e.Message)
					continue
				}
				s.a.log.Warn("bridge error before welcome", "code", e.Code, "msg", e.Message)
			default:
				if !s.a.resync() {
					return wire.Welcome{}, fmt.Errorf("protocol: %s frame before welcome", f.Type)
				}
				s.a.log.Debug("skipped a stale frame before welcome", "type", f.Type.String())
			}
		}
	}
}

// bridgeError turns a fatal Error frame into the error a session ends
// with.
func bridgeError(e *wire.Error) error {
	if e.Code == wire.CodeEnded {
		return fmt.Errorf("%w: %w", ErrEnded, e)
	}
	return e
}

// stream sends measurement frames (at most the window unacknowledged) and
// handles what the bridge sends back.
func (s *session) stream(ctx context.Context, w wire.Welcome, frames <-chan wire.Frame, rerr <-chan error) error {
	a := s.a
	window := max(1, int(w.Window))
	maxEntries := a.cfg.MaxEntriesPerFrame
	if w.MaxEntries > 0 {
		maxEntries = min(maxEntries, int(w.MaxEntries))
	}
	maxPayload := wire.PreferredPayload
	if w.MaxPayload > 0 {
		maxPayload = min(maxPayload, int(w.MaxPayload))
	}
	next := w.Resume // the log index after the last frame sent

	// Evidence requests an earlier session could not answer go again.
	for _, r := range s.carry {
		if err := s.request(r, &next); err != nil {
			return err
		}
	}
	s.carry = nil

	ping := time.NewTicker(a.cfg.PingInterval)
	defer ping.Stop()
	lastRecv := time.Now()
	var poll <-chan time.Time
	for {
		// Fill the window from the list.
		for len(s.queue) < window && poll == nil {
			m, ok, err := s.src.frame(maxEntries, maxPayload)
			if err != nil {
				return err
			}
			if !ok {
				poll = time.After(a.cfg.PollInterval)
				break
			}
			m.Seq = a.nextID()
			if err := s.send(wire.TypeMeasurements, m); err != nil {
				return err
			}
			next = m.First + uint64(len(m.Entries))
			s.queue = append(s.queue, inflight{seq: m.Seq, next: next, sent: time.Now()})
		}
		var reqs chan *request
		if len(s.queue) < window {
			reqs = a.reqs
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-rerr:
			return fmt.Errorf("read from bridge: %w", err)
		case <-poll:
			poll = nil
		case <-ping.C:
			if since := time.Since(lastRecv); since > a.cfg.PingTimeout {
				return fmt.Errorf("nothing from the bridge for %v: presumed dead", since.Round(time.Millisecond))
			}
			// A bridge that answers pings but acknowledges nothing has lost
			// the session (on virtio-serial a restarted bridge waits for a
			// hello and skips measurement frames): say hello again.
			if len(s.queue) > 0 {
				if age := time.Since(s.queue[0].sent); age > a.cfg.PingTimeout {
					return fmt.Errorf("no ack from the bridge for %v: restarting the session", age.Round(time.Millisecond))
				}
			}
			if err := s.send(wire.TypePing, &wire.Ping{Seq: a.nextID()}); err != nil {
				return err
			}
		case r := <-reqs:
			if err := s.request(r, &next); err != nil {
				return err
			}
		case f := <-frames:
			lastRecv = time.Now()
			if err := s.handle(f); err != nil {
				return err
			}
		}
	}
}

// request sends a caller's request on the stream.
func (s *session) request(r *request, next *uint64) error {
	if r.ctx.Err() != nil {
		return nil
	}
	id := s.a.nextID()
	switch r.typ {
	case wire.TypeEvidenceRequest:
		s.waiting[id] = r
		if err := s.send(wire.TypeEvidenceRequest, &wire.EvidenceRequest{ID: id, Nonce: r.nonce, Since: r.since, Early: r.early}); err != nil {
			return err
		}
	case wire.TypeBind:
		s.queue = append(s.queue, inflight{seq: id, next: *next, sent: time.Now(), bind: r})
		if err := s.send(wire.TypeBind, &wire.Bind{Seq: id, Purpose: r.purpose, KeyHash: r.keyHash}); err != nil {
			return err
		}
	default:
		r.finish(nil, fmt.Errorf("agent: unknown request %s", r.typ))
	}
	return nil
}

// handle processes one frame from the bridge.
func (s *session) handle(f wire.Frame) error {
	a := s.a
	switch f.Type {
	case wire.TypeAck:
		var m wire.Ack
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		i := 0
		for i < len(s.queue) && s.queue[i].seq != m.Seq {
			i++
		}
		if i == len(s.queue) {
			if a.resync() {
				a.log.Debug("ignored an ack of no frame in flight", "seq", m.Seq)
				return nil
			}
			return fmt.Errorf("protocol: ack of seq %d, which is not in flight", m.Seq)
		}
		// Acks come in order: this one covers every frame before it.
		for _, d := range s.queue[:i+1] {
			if d.bind != nil {
				d.bind.finish(nil, nil)
			}
		}
		if want := s.queue[i].next; m.Next != want {
			a.log.Warn("bridge acknowledged another position than sent", "seq", m.Seq, "next", m.Next, "sent_to", want)
		}
		s.queue = append(s.queue[:0], s.queue[i+1:]...)
		a.log.Debug("acknowledged", "seq", m.Seq, "next", m.Next)
	case wire.TypeError:
		var e wire.Error
		if err := wire.Decode(f, &e); err != nil {
			return err
		}
		if r, ok := s.waiting[e.Seq]; ok && e.Code == wire.CodeEvidence {
			delete(s.waiting, e.Seq)
			r.finish(nil, &e)
			return nil
		}
		if e.Fatal {
			return bridgeError(&e)
		}
		if e.Code == wire.CodeHello {
			// The bridge restarted, or the VM migrated to another host's
			// bridge: a new session resumes where that bridge stands.
			return fmt.Errorf("the bridge asked for a new session: %s", e.Message)
		}
		a.log.Warn("bridge error", "code", e.Code, "msg", e.Message, "seq", e.Seq)
	case wire.TypeEvidenceResponse:
		var m wire.EvidenceResponse
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		if r, ok := s.waiting[m.ID]; ok {
			// Evidence larger than one frame comes in parts.
			whole, err := r.parts.Add(&m)
			if err != nil {
				delete(s.waiting, m.ID)
				r.finish(nil, fmt.Errorf("evidence from the bridge: %w", err))
			} else if whole != nil {
				delete(s.waiting, m.ID)
				r.finish(whole, nil)
			}
		} else {
			a.log.Debug("ignored an evidence response nobody waits for", "id", m.ID)
		}
	case wire.TypePong:
	case wire.TypePing:
		var m wire.Ping
		if err := wire.Decode(f, &m); err != nil {
			return err
		}
		return s.send(wire.TypePong, &wire.Pong{Seq: m.Seq})
	case wire.TypeWelcome:
		// A second welcome: the bridge answered a hello this session did
		// not send (a stale one on virtio-serial). Start over cleanly.
		return errors.New("protocol: unexpected welcome: restarting the session")
	default:
		if a.resync() {
			a.log.Debug("ignored a frame", "type", f.Type.String())
			return nil
		}
		return fmt.Errorf("protocol: unexpected %s frame from the bridge", f.Type)
	}
	return nil
}
