package bridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// Session limits, the bridge's side of docs/security.md's threat model: a guest that floods
// is slowed by the window (its frames wait in its own socket), one that
// sends garbage or breaks the protocol is dropped, one that stalls is cut
// off by the timeouts; none of it touches other VMs' sessions.
const (
	// Window is how many measurement frames of one VM may be submitted and
	// not yet acknowledged.
	Window = 4
	// HelloTimeout bounds the wait for a new connection's Hello.
	HelloTimeout = 10 * time.Second
	// WriteTimeout bounds one write to a guest that does not read.
	WriteTimeout = 10 * time.Second
)

// GuestConn is one guest connection as a transport hands it over.
type GuestConn interface {
	io.ReadWriteCloser
}

type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// sessions keeps one live session per VM: a new connection replaces the
// old one (an agent that reconnected), after the old one has drained.
type sessions struct {
	live map[conceal.Digest]*session
}

type session struct {
	conn GuestConn
	done chan struct{}
}

// Serve runs the guest protocol on conn for the VM instance id, which the
// transport established (per-VM listener, vsock peer CID): nothing the
// guest says can change which VM it is. resync is true for byte streams
// without message boundaries (virtio-serial). A connection that opens with
// Hello is the VM's stream session and replaces any earlier one; one that
// opens with an evidence request is served beside it. Serve returns when the
// connection ends; the error says why.
func (b *Bridge) Serve(ctx context.Context, id conceal.Digest, conn GuestConn, resync bool) error {
	defer conn.Close()
	wc := wire.NewConn(conn, resync)
	dl, _ := conn.(deadliner)
	out := &sender{conn: wc, dl: dl}
	err := b.serveConn(ctx, id, conn, wc, out, resync)
	if err != nil && !errors.Is(err, io.EOF) {
		b.logger().Warn("guest connection ended", "vm", b.nameOf(id), "err", err)
	}
	return err
}

func (b *Bridge) serveConn(ctx context.Context, id conceal.Digest, conn GuestConn, wc *wire.Conn, out *sender, resync bool) error {
	if out.dl != nil {
		out.dl.SetReadDeadline(time.Now().Add(HelloTimeout))
	}
	var first wire.Frame
	hinted := false
	for {
		f, err := wc.Recv()
		if err != nil {
			return fmt.Errorf("read hello: %w", err)
		}
		if f.Type == wire.TypeHello || f.Type == wire.TypeEvidenceRequest {
			first = f
			break
		}
		if !resync {
			out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: "expected hello", Fatal: true})
			return fmt.Errorf("first frame is %s, not hello", f.Type)
		}
		// On virtio-serial, frames of an earlier session may still be in
		// the stream: skip to the hello. A live agent's ping or frame
		// here means it still talks to a session this bridge does not
		// hold (a restart, or a VM that migrated here): ask it once to
		// say hello, instead of leaving it to its ping timeout. An agent
		// already saying hello gets this before its welcome, and ignores
		// it there.
		if !hinted && (f.Type == wire.TypePing || f.Type == wire.TypeMeasurements) {
			hinted = true
			out.send(wire.TypeError, &wire.Error{Code: wire.CodeHello, Message: "no session on this stream (the bridge restarted, or the VM migrated here): say hello"})
		}
	}
	if out.dl != nil {
		out.dl.SetReadDeadline(time.Time{})
	}
	if first.Type == wire.TypeEvidenceRequest {
		hello, err := b.attestOnly(ctx, id, wc, out, first, resync)
		if err != nil {
			return err
		}
		// On virtio-serial the stream outlives the attest: the agent that
		// starts afterwards says hello on it.
		first = hello
	}
	s := &session{conn: conn, done: make(chan struct{})}
	defer close(s.done)
	b.sessMu.Lock()
	if b.sess.live == nil {
		b.sess.live = make(map[conceal.Digest]*session)
	}
	old := b.sess.live[id]
	b.sess.live[id] = s
	b.sessMu.Unlock()
	if old != nil {
		// The agent reconnected: end the old session and let its
		// submitted records settle before computing where to resume.
		old.conn.Close()
		<-old.done
	}
	defer func() {
		b.sessMu.Lock()
		if b.sess.live[id] == s {
			delete(b.sess.live, id)
		}
		b.sessMu.Unlock()
	}()
	for {
		var hello wire.Hello
		if err := wire.Decode(first, &hello); err != nil {
			out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: err.Error(), Fatal: true})
			return err
		}
		err := b.session(ctx, id, conn, wc, out, hello, resync)
		var rh *rehello
		if errors.As(err, &rh) {
			// The agent restarted on the same virtio-serial stream.
			first = rh.frame
			continue
		}
		var ge *guestError
		if resync && errors.As(err, &ge) {
			// On virtio-serial this stream is the VM's only channel: a
			// guest that broke the protocol was told why, and the next
			// agent to say hello gets a fresh session on it.
			b.logger().Warn("guest broke the protocol; waiting for a new hello on its serial stream", "vm", b.nameOf(id), "err", err)
			if first, err = nextHello(wc); err != nil {
				return err
			}
			continue
		}
		return err
	}
}

// guestError is a protocol violation by the guest, already reported to it.
type guestError struct{ code, msg string }

func (e *guestError) Error() string { return fmt.Sprintf("guest %s: %s", e.code, e.msg) }

// nextHello skips frames until the next Hello.
func nextHello(wc *wire.Conn) (wire.Frame, error) {
	for {
		f, err := wc.Recv()
		if err != nil {
			return wire.Frame{}, err
		}
		if f.Type == wire.TypeHello {
			return f, nil
		}
	}
}

// rehello ends a session because a new Hello arrived on the same stream.
type rehello struct{ frame wire.Frame }

func (*rehello) Error() string { return "agent sent a new hello" }

// attestOnly serves a connection that only asks for evidence (the
// tpmmux-agent attest command beside a running agent). On a resync stream
// (virtio-serial, which is the VM's only channel and outlives the attest
// command) a later Hello hands the stream over to a stream session: it is
// returned; other unexpected frames there are stale and skipped.
func (b *Bridge) attestOnly(ctx context.Context, id conceal.Digest, wc *wire.Conn, out *sender, f wire.Frame, resync bool) (wire.Frame, error) {
	for {
		switch f.Type {
		case wire.TypeEvidenceRequest:
			var m wire.EvidenceRequest
			if err := wire.Decode(f, &m); err != nil {
				out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: err.Error(), Fatal: true})
				return wire.Frame{}, err
			}
			if err := b.serveEvidence(ctx, id, m, out); err != nil {
				return wire.Frame{}, err
			}
		case wire.TypePing:
			var m wire.Ping
			if err := wire.Decode(f, &m); err != nil {
				return wire.Frame{}, err
			}
			if err := out.send(wire.TypePong, &wire.Pong{Seq: m.Seq}); err != nil {
				return wire.Frame{}, err
			}
		case wire.TypeHello:
			if resync {
				return f, nil
			}
			fallthrough
		default:
			if resync {
				break // a stale frame of an earlier agent
			}
			out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: fmt.Sprintf("unexpected %s frame on an evidence connection", f.Type), Fatal: true})
			return wire.Frame{}, fmt.Errorf("unexpected %s frame on an evidence connection", f.Type)
		}
		var err error
		if f, err = wc.Recv(); err != nil {
			return wire.Frame{}, err
		}
	}
}

type sender struct {
	mu      sync.Mutex
	conn    *wire.Conn
	dl      deadliner
	scratch []byte    // the evidence frames' own bytes, reused (sendEvidence)
	armed   time.Time // when the write deadline was last set
}

// rearmAfter is how stale the write deadline may be before a write sets it
// again: every write gets between WriteTimeout-rearmAfter and WriteTimeout,
// and a bridge answering a thousand evidence requests a quote does not
// replace a connection's deadline timer for each.
const rearmAfter = time.Second

// arm sets the write deadline to WriteTimeout from now unless it was set
// less than rearmAfter ago; s.mu is held.
func (s *sender) arm() {
	if s.dl == nil {
		return
	}
	now := time.Now()
	if !s.armed.IsZero() && now.Sub(s.armed) < rearmAfter {
		return
	}
	s.dl.SetWriteDeadline(now.Add(WriteTimeout))
	s.armed = now
}

func (s *sender) send(t wire.Type, m any) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.arm()
	return s.conn.Send(t, m)
}

// maxScratch bounds the frame buffer a connection keeps between evidence
// responses (a small response's own bytes); a larger one is dropped after
// its frame is sent.
const maxScratch = 64 << 10

// sendEvidence frames an evidence response around its part
// (wire.EvidenceFrame) in the connection's reused buffer and writes it.
func (s *sender) sendEvidence(resp *wire.EvidenceResponse, p *mux.EvidencePart) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	frame, err := wire.EvidenceFrame(&s.scratch, resp, p.Head, p.Shared, p.Tail)
	if err != nil {
		return err
	}
	if cap(s.scratch) > maxScratch {
		s.scratch = nil
	}
	s.arm()
	return s.conn.SendFrame(wire.TypeEvidenceResponse, frame)
}

type pendingAck struct {
	seq    uint64
	next   uint64
	ticket *mux.Ticket
	weight int64 // records held from the host-wide budget until settled
	silent bool  // the bridge's own record (a quota action): wait, do not ack
}

// DefaultMaxQueued is the default host-wide budget of guest records that
// may be submitted and not yet settled, across all VMs: with the per-VM
// window it bounds the bridge's memory however many VMs stream at once.
const DefaultMaxQueued = 1 << 18

// queued returns the host-wide budget of submitted, unsettled records. A
// session that cannot take its frame's share stops reading, which slows
// that guest through its own transport.
func (b *Bridge) queued() *semaphore.Weighted {
	b.budgetOnce.Do(func() {
		n := int64(b.MaxQueued)
		if n <= 0 {
			n = DefaultMaxQueued
		}
		b.budget, b.budgetMax = semaphore.NewWeighted(n), n
	})
	return b.budget
}

func (b *Bridge) session(ctx context.Context, id conceal.Digest, conn GuestConn, wc *wire.Conn, out *sender, hello wire.Hello, resync bool) error {
	if hello.Proto != wire.Version {
		out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: fmt.Sprintf("protocol %d not supported (bridge speaks %d)", hello.Proto, wire.Version), Fatal: true})
		return fmt.Errorf("agent speaks protocol %d", hello.Proto)
	}
	if len(hello.BootID) > 64 {
		out.send(wire.TypeError, &wire.Error{Code: wire.CodeProtocol, Message: "boot id too long", Fatal: true})
		return errors.New("boot id too long")
	}
	next, name, err := b.resume(ctx, id, hello.BootID)
	if err != nil {
		code := wire.CodeUnavailable
		if errors.Is(err, mux.ErrEnded) {
			code = wire.CodeEnded
			b.forgetQuota(id)
		}
		out.send(wire.TypeError, &wire.Error{Code: code, Message: err.Error(), Fatal: true})
		return err
	}
	if err := out.send(wire.TypeWelcome, &wire.Welcome{VM: name, Resume: next, MaxEntries: wire.MaxEntries, MaxPayload: wire.MaxPayload, Window: Window}); err != nil {
		return err
	}
	b.logger().Info("guest session", "vm", name, "boot_id", hello.BootID, "resume", next)

	acks := make(chan pendingAck, Window)
	ackErr := make(chan error, 1)
	go func() {
		var err error
		for p := range acks {
			// Every submitted ticket is waited for, even after an error, so
			// that when the session ends all its records have settled
			// (durable or failed) before anyone computes a resume point.
			// The ack says durable and extended; it does not wait for the
			// records' batch to be in bbolt (the write-ahead log holds them,
			// and readers that need bbolt wait for it themselves), nor
			// make the applier write it at once.
			var werr error
			if p.ticket != nil {
				werr = p.ticket.WaitExtended(context.WithoutCancel(ctx))
			}
			if p.weight > 0 {
				b.queued().Release(p.weight)
			}
			if err != nil {
				continue
			}
			if p.ticket != nil {
				if werr != nil {
					code := wire.CodeUnavailable
					if errors.Is(werr, mux.ErrEnded) {
						code = wire.CodeEnded
					}
					out.send(wire.TypeError, &wire.Error{Code: code, Message: werr.Error(), Fatal: true, Seq: p.seq})
					err = werr
					conn.Close()
					continue
				}
			}
			if p.silent {
				continue
			}
			if serr := out.send(wire.TypeAck, &wire.Ack{Seq: p.seq, Next: p.next}); serr != nil {
				err = serr
				conn.Close()
			}
		}
		ackErr <- err
	}()
	count, err := b.Mux.NextSeq(id)
	if err != nil {
		close(acks)
		<-ackErr
		out.send(wire.TypeError, &wire.Error{Code: wire.CodeUnavailable, Message: err.Error(), Fatal: true})
		return err
	}
	lim := &limits{q: b.quotaFor(id), qc: b.quota(), count: int64(count)}
	err = b.loop(ctx, id, wc, out, acks, next, hello.BootID, resync, lim)
	close(acks)
	aerr := <-ackErr
	if err == nil {
		err = aerr
	}
	return err
}

// limits is one session's view of its VM's quota.
type limits struct {
	q     *vmQuota
	qc    Quota
	count int64 // the VM instance's records, durable and submitted
}

func (b *Bridge) loop(ctx context.Context, id conceal.Digest, wc *wire.Conn, out *sender, acks chan<- pendingAck, next uint64, bootID string, resync bool, lim *limits) error {
	g := &guestLoop{b: b, ctx: ctx, id: id, out: out, acks: acks, next: next, bootID: bootID, lim: lim}
	for {
		f, err := wc.Recv()
		if err != nil {
			return err
		}
		switch f.Type {
		case wire.TypeMeasurements:
			err = g.measurements(f)
		case wire.TypeBind:
			err = g.bind(f)
		case wire.TypeEvidenceRequest:
			var m wire.EvidenceRequest
			if err := wire.Decode(f, &m); err != nil {
				return g.fatal(wire.CodeProtocol, "%v", err)
			}
			err = b.serveEvidence(ctx, id, m, out)
		case wire.TypeHello:
			if !resync {
				return g.fatal(wire.CodeProtocol, "a second hello on one connection")
			}
			return &rehello{frame: f}
		case wire.TypePing:
			var m wire.Ping
			if err := wire.Decode(f, &m); err != nil {
				return g.fatal(wire.CodeProtocol, "%v", err)
			}
			err = out.send(wire.TypePong, &wire.Pong{Seq: m.Seq})
		default:
			return g.fatal(wire.CodeProtocol, "unexpected %s frame", f.Type)
		}
		if err != nil {
			return err
		}
	}
}

// guestLoop is one guest session's frame loop: where the guest's stream
// stands and its quota.
type guestLoop struct {
	b      *Bridge
	ctx    context.Context
	id     conceal.Digest
	out    *sender
	acks   chan<- pendingAck
	next   uint64
	bootID string
	lim    *limits
}

// fatal tells the guest of a fatal error and ends the session.
func (g *guestLoop) fatal(code, format string, a ...any) error {
	msg := fmt.Sprintf(format, a...)
	g.out.send(wire.TypeError, &wire.Error{Code: code, Message: msg, Fatal: true})
	return &guestError{code: code, msg: msg}
}

// note puts an action record about a quota into the VM's own log.
func (g *guestLoop) note(action, detail string) error {
	b := g.b
	t, err := b.Mux.Submit(g.id, &record.Record{Kind: record.KindAction, Time: b.now().UnixNano(), Action: &record.Action{Action: action, Detail: detail}})
	if err != nil {
		return g.fatal(wire.CodeUnavailable, "%v", err)
	}
	g.lim.count++
	b.logger().Warn("guest over quota", "vm", b.nameOf(g.id), "action", action, "detail", detail)
	select {
	case g.acks <- pendingAck{ticket: t, silent: true}:
		return nil
	case <-g.ctx.Done():
		return g.ctx.Err()
	}
}

// admit enforces the quota on a frame of n records of size bytes: the
// record limit refuses it, the rates slow it.
func (g *guestLoop) admit(seq uint64, n, size int) error {
	lim := g.lim
	if lim.qc.MaxRecords > 0 && lim.count+int64(n) > lim.qc.MaxRecords {
		msg := fmt.Sprintf("this VM instance has %d records; %d more exceed the per-VM limit of %d records (bridge quota max_records): nothing of this frame is acknowledged; restart the VM for a new instance", lim.count, n, lim.qc.MaxRecords)
		lim.q.mu.Lock()
		first := !lim.q.capped
		lim.q.capped = true
		lim.q.mu.Unlock()
		if first {
			if err := g.note("quota-records", msg); err != nil {
				return err
			}
		}
		return g.fatal(wire.CodeQuota, "%s", msg)
	}
	adm := lim.q.admit(lim.qc, n, size, g.b.now())
	if adm.episode != "" {
		if err := g.out.send(wire.TypeError, &wire.Error{Code: wire.CodeQuota, Message: adm.episode, Seq: seq}); err != nil {
			return err
		}
		if err := g.note("quota-rate", adm.episode); err != nil {
			return err
		}
	}
	if adm.wait > 0 {
		tm := time.NewTimer(adm.wait)
		defer tm.Stop()
		select {
		case <-tm.C:
		case <-g.ctx.Done():
			return g.ctx.Err()
		}
	}
	return nil
}

// measurements takes a frame of IMA entries: those not yet durable are
// checked against the quota and submitted.
func (g *guestLoop) measurements(f wire.Frame) error {
	b, lim := g.b, g.lim
	var m wire.Measurements
	if err := wire.Decode(f, &m); err != nil {
		return g.fatal(wire.CodeProtocol, "%v", err)
	}
	if m.First > g.next {
		return g.fatal(wire.CodeGap, "entries start at log index %d, the bridge needs %d first", m.First, g.next)
	}
	skip := g.next - m.First
	if skip >= uint64(len(m.Entries)) {
		g.acks <- pendingAck{seq: m.Seq, next: g.next} // all already durable
		return nil
	}
	recs := make([]*record.Record, 0, len(m.Entries)-int(skip))
	size := 0
	for i, e := range m.Entries[skip:] {
		idx := g.next + uint64(i)
		if limit := lim.qc.MaxEntryBytes; limit > 0 && len(e.Data) > limit {
			msg := fmt.Sprintf("entry %d: template data of %d bytes exceeds the per-entry limit of %d bytes (bridge quota max_entry_bytes); nothing from this entry on is acknowledged", idx, len(e.Data), limit)
			if err := g.note("quota-entry-size", msg); err != nil {
				return err
			}
			return g.fatal(wire.CodeQuota, "%s", msg)
		}
		size += len(e.Data) + len(e.TemplateHash) + len(e.Template)
	}
	if err := g.admit(m.Seq, len(m.Entries)-int(skip), size); err != nil {
		return err
	}
	now := b.now().UnixNano()
	for i, e := range m.Entries[skip:] {
		idx := g.next + uint64(i)
		r, err := measurementRecord(e, idx, g.bootID, now)
		if err != nil {
			return g.fatal(wire.CodeBadEntry, "entry %d: %v", idx, err)
		}
		recs = append(recs, r)
	}
	w := min(int64(len(recs)), b.budgetLimit())
	if err := b.queued().Acquire(g.ctx, w); err != nil {
		return err
	}
	t, err := b.Mux.Submit(g.id, recs...)
	if err != nil {
		b.queued().Release(w)
		code := wire.CodeUnavailable
		if errors.Is(err, mux.ErrEnded) || errors.Is(err, mux.ErrUnknownVM) {
			code = wire.CodeEnded
		}
		return g.fatal(code, "%v", err)
	}
	g.next += uint64(len(recs))
	lim.count += int64(len(recs))
	select {
	case g.acks <- pendingAck{seq: m.Seq, next: g.next, ticket: t, weight: w}:
		return nil
	case <-g.ctx.Done():
		return g.ctx.Err()
	}
}

// bind takes a key binding from the guest.
func (g *guestLoop) bind(f wire.Frame) error {
	b := g.b
	var m wire.Bind
	if err := wire.Decode(f, &m); err != nil {
		return g.fatal(wire.CodeProtocol, "%v", err)
	}
	if m.Purpose == "" || len(m.Purpose) > 64 {
		return g.fatal(wire.CodeProtocol, "bind purpose of %d bytes", len(m.Purpose))
	}
	if err := g.admit(m.Seq, 1, len(m.Purpose)+len(m.KeyHash)); err != nil {
		return err
	}
	t, err := b.Mux.Submit(g.id, &record.Record{Kind: record.KindBinding, Time: b.now().UnixNano(), Binding: &record.Binding{Purpose: m.Purpose, KeyHash: m.KeyHash}})
	if err != nil {
		return g.fatal(wire.CodeUnavailable, "%v", err)
	}
	g.lim.count++
	g.acks <- pendingAck{seq: m.Seq, next: g.next, ticket: t}
	return nil
}

// resume decides where the guest's stream continues. A boot id other than
// the one of the newest durable measurement starts a new guest boot: the
// bridge records a reboot record and resumes at index 0.
func (b *Bridge) resume(ctx context.Context, id conceal.Digest, bootID string) (uint64, string, error) {
	gs, err := b.Mux.Guest(id)
	if err != nil {
		return 0, "", err
	}
	if gs.Ended {
		return 0, "", fmt.Errorf("vm instance %x: %w", id[:6], mux.ErrEnded)
	}
	name := b.nameOf(id)
	if gs.BootID == "" || gs.BootID == bootID {
		return gs.Next, name, nil
	}
	r := &record.Record{Kind: record.KindReboot, Time: b.now().UnixNano(), Reboot: &record.Reboot{Reason: "new-boot-id", BootID: bootID}}
	if _, err := b.Mux.Append(ctx, id, r); err != nil {
		return 0, "", fmt.Errorf("record new guest boot: %w", err)
	}
	return 0, name, nil
}

func (b *Bridge) nameOf(id conceal.Digest) string {
	info, err := b.Mux.Info(id)
	if err != nil {
		return ""
	}
	return info.Name
}

// measurementRecord validates one guest entry and makes its record.
func measurementRecord(e wire.Entry, idx uint64, bootID string, now int64) (*record.Record, error) {
	if e.Template == "" || len(e.Template) > ima.MaxTemplateNameLen {
		return nil, fmt.Errorf("template name of %d bytes", len(e.Template))
	}
	if len(e.Data) > ima.MaxTemplateDataLen {
		return nil, fmt.Errorf("template data of %d bytes exceeds %d", len(e.Data), ima.MaxTemplateDataLen)
	}
	m := &record.Measurement{PCR: e.PCR, TemplateHashAlg: e.HashAlg, TemplateHash: e.TemplateHash, Template: e.Template,
		TemplateData: e.Data, LogIndex: idx, BootID: bootID}
	r := &record.Record{Kind: record.KindMeasurement, Time: now, Measurement: m}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if err := m.CheckTemplateHash(); err != nil {
		return nil, err
	}
	return r, nil
}

// serveEvidence answers a guest's own evidence request, full or since a
// checkpoint, streamed from the store (mux.StreamEvidenceParts) in parts
// of at most wire.EvidenceChunk bytes, so that however long the log is and
// however many guests ask at once, no request holds the whole log in
// memory. A part whose log segment the requests of one quote share is
// framed around the shared bytes (wire.EvidenceFrame: the segment's
// checksum was computed once) and sent with one vectored write, so a
// response costs the bridge its own bytes, not a copy of the log. A
// request the bridge cannot serve, or that fails part way, gets an
// evidence error; only a failure to send ends the connection.
func (b *Bridge) serveEvidence(ctx context.Context, id conceal.Digest, m wire.EvidenceRequest, out *sender) error {
	err := b.streamEvidence(ctx, id, m, func(resp *wire.EvidenceResponse, p *mux.EvidencePart) error {
		if err := out.sendEvidence(resp, p); err != nil {
			return &sendError{err}
		}
		return nil
	})
	var se *sendError
	if errors.As(err, &se) {
		return se.err
	}
	if err != nil {
		return out.send(wire.TypeError, &wire.Error{Code: wire.CodeEvidence, Message: err.Error(), Seq: m.ID})
	}
	return nil
}

type sendError struct{ err error }

func (e *sendError) Error() string { return e.err.Error() }

// streamEvidence produces the responses to a guest's evidence request, each
// with its part of the evidence: one when the evidence fits a part, else
// parts 0, 1, … with More set on all but the last; part 0 carries the
// identity and the AK. A request with Early may get the evidence's end in
// an early part while the quote is taken (mux.StreamEvidenceParts).
func (b *Bridge) streamEvidence(ctx context.Context, id conceal.Digest, m wire.EvidenceRequest, send func(*wire.EvidenceResponse, *mux.EvidencePart) error) error {
	if len(m.Nonce) == 0 || len(m.Nonce) > 64 {
		return fmt.Errorf("nonce of %d bytes, want 1 to 64", len(m.Nonce))
	}
	var since *evidence.Since
	if m.Since != nil {
		since = &evidence.Since{Batch: m.Since.Batch, Records: m.Since.Records}
	}
	part := uint32(0)
	return b.Mux.StreamEvidenceParts(ctx, id, m.Nonce, since, wire.EvidenceChunk, true, m.Early, func(p *mux.EvidencePart) error {
		resp := &wire.EvidenceResponse{ID: m.ID, Part: part, More: !p.Last, Early: p.Early}
		if part == 0 {
			if p.Identity == nil {
				return errors.New("evidence without the VM's identity")
			}
			resp.UUID, resp.Instance, resp.Key = p.Identity.UUID, p.Identity.Instance, p.Identity.Key
			resp.AKPEM = b.Mux.AKPEM() // encoded once
		}
		part++
		return send(resp, p)
	})
}

func (b *Bridge) now() time.Time { return time.Now() }

// budgetLimit is the size of the host-wide budget.
func (b *Bridge) budgetLimit() int64 {
	b.queued()
	return b.budgetMax
}
