package vtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// dataPartialTimeout bounds the wait for the rest of a TPM command whose
// first bytes arrived. QEMU writes each command with one write, so only a
// malformed or hostile peer ever waits this long; it then gets
// TPM_RC_COMMAND_SIZE.
const dataPartialTimeout = 2 * time.Second

// dataWriteTimeout bounds a response write: a peer that stops reading
// responses loses its data connection, and nobody else waits for it.
const dataWriteTimeout = 30 * time.Second

// claimData makes c the vTPM's data connection unless it has another.
func (v *VTPM) claimData(c net.Conn) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.data != nil && v.data != c {
		return false
	}
	v.data = c
	return true
}

// DataConn returns the data connection in use (received by
// CMD_SET_DATAFD or given to ServeData), or nil: what a bridge hands over,
// with the control connection, to the process that replaces it.
func (v *VTPM) DataConn() net.Conn {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.data
}

// ServeData serves TPM commands on data, a data connection taken over from
// a previous bridge process (whose control connection goes to
// ServeControl), until the peer closes it (nil), an I/O error, or ctx ends
// (ctx.Err(); data stays open). It fails if the vTPM already serves another
// data connection.
func (v *VTPM) ServeData(ctx context.Context, data net.Conn) error {
	if !v.claimData(data) {
		return errors.New("vtpm: the vTPM already has a data connection")
	}
	if err := v.finishPending(ctx, data); err != nil {
		return err
	}
	return v.serveData(ctx, data)
}

// StartData serves data as ServeData does, in the background, and calls
// done with ServeData's result; with a Config.Parker the idle channel
// holds no goroutine (see StartControl).
func (v *VTPM) StartData(ctx context.Context, data net.Conn, done func(error)) {
	if !v.claimData(data) {
		done(errors.New("vtpm: the vTPM already has a data connection"))
		return
	}
	go func() {
		if err := v.finishPending(ctx, data); err != nil {
			done(err)
			return
		}
		v.startData(ctx, data, done)
	}()
}

// finishPending answers the command a crashed process had read from data
// (Config.Inflight) before anything else is read. If its journal event is
// already recorded (the event after the recorded Seq is this command's), it
// is answered without being journaled again; if not, it runs now.
func (v *VTPM) finishPending(ctx context.Context, data net.Conn) error {
	if v.inf == nil {
		return nil
	}
	seq, cmd, ok, err := v.inf.Pending()
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	cc := binary.BigEndian.Uint32(cmd[6:10])
	v.mu.Lock()
	var resp []byte
	switch {
	case v.st.Seq() == seq:
		resp = v.executeLocked(ctx, cmd)
	case v.st.Seq() == seq+1 && v.last.Kind != vpcr.KindInit && v.last.Command == cc:
		v.replay = true
		resp = v.executeLocked(ctx, cmd)
		v.replay = false
	default:
		v.log.Error("vtpm: cannot tell whether the in-flight command ran; answering TPM_RC_RETRY",
			"cc", cc, "recorded_seq", seq, "journal_seq", v.st.Seq())
		resp = errorResponse(rcRetry)
	}
	v.mu.Unlock()
	v.log.Info("vtpm: answered the command in flight at the previous process's end", "cc", cc, "rc", binary.BigEndian.Uint32(resp[6:10]))
	data.SetWriteDeadline(time.Now().Add(dataWriteTimeout))
	defer data.SetWriteDeadline(time.Time{})
	if _, err := data.Write(resp); err != nil {
		return fmt.Errorf("vtpm: write the in-flight command's answer: %w", err)
	}
	return v.inf.Done()
}

// serveData is the data channel loop. It closes c when the peer is gone,
// and leaves it open when ctx ends (for a handover).
func (v *VTPM) serveData(ctx context.Context, c net.Conn) error {
	ch := make(chan error, 1)
	v.startData(ctx, c, func(err error) { ch <- err })
	return <-ch
}

// startData serves the data channel c as serveData does, in the
// background, and calls done with its result. While idle the channel
// waits in v's Parker (if any) with no goroutine of its own.
func (v *VTPM) startData(ctx context.Context, c net.Conn, done func(error)) {
	s := &dataSession{v: v, ctx: ctx, c: c, r: cmdReader{c: c}, done: done}
	s.stop = context.AfterFunc(ctx, s.interrupt)
	go s.run()
}

// dataSession is one served data channel: what its loop keeps while the
// channel is parked.
type dataSession struct {
	v   *VTPM
	ctx context.Context
	c   net.Conn
	r   cmdReader
	// stop ends the cancellation's AfterFunc (interrupt), registered
	// while a goroutine serves (a parked channel has the Parker's).
	stop func() bool
	done func(error)
}

// interrupt is the convention by which a cancellation reaches a read in
// progress: a past read deadline.
func (s *dataSession) interrupt() { s.c.SetReadDeadline(time.Now()) }

// run serves until the channel ends or parks.
func (s *dataSession) run() {
	for {
		err := s.serve()
		if err == errIdle {
			s.stop()
			if s.v.park(s.ctx, s.c, s.resume) {
				return
			}
			s.stop = context.AfterFunc(s.ctx, s.interrupt)
			// No Parker: wait here (an error shows in the read that
			// follows).
			waitReady(s.ctx, s.c, true)
			s.r.resumed = true
			continue
		}
		s.stop()
		if s.ctx.Err() == nil {
			s.v.mu.Lock()
			if s.v.data == s.c {
				s.v.data = nil
			}
			s.v.mu.Unlock()
			s.c.Close()
		} // else a handover: c stays open and reported by DataConn
		s.done(err)
		return
	}
}

// resume goes on serving a channel its Parker woke.
func (s *dataSession) resume() {
	s.r.resumed = true
	s.stop = context.AfterFunc(s.ctx, s.interrupt)
	s.run()
}

// serve reads and answers commands until an error, the channel's end, or
// its idle time (errIdle).
func (s *dataSession) serve() error {
	v, c, ctx := s.v, s.c, s.ctx
	for {
		cmd, err := s.r.next(ctx, int(v.BufferSize()))
		if err != nil {
			if err == errIdle {
				return err
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("vtpm: read TPM command: %w", err)
		}
		var resp []byte
		if cmd == nil {
			v.log.Warn("vtpm: malformed TPM command (size field and bytes disagree); answering TPM_RC_COMMAND_SIZE")
			resp = errorResponse(rcCommandSize)
		} else {
			resp = v.Execute(ctx, cmd)
		}
		c.SetWriteDeadline(time.Now().Add(dataWriteTimeout))
		if _, err := c.Write(resp); err != nil {
			return fmt.Errorf("vtpm: write TPM response: %w", err)
		}
		c.SetWriteDeadline(time.Time{})
		if v.inf != nil && cmd != nil {
			if err := v.inf.Done(); err != nil {
				v.log.Error("vtpm: in-flight record not cleared; a takeover would answer twice", "err", err)
			}
		}
	}
}

// cmdReader splits a byte stream into TPM commands by their size field.
type cmdReader struct {
	c   net.Conn
	buf []byte // MaxBufferSize+1 bytes; nil while idle (first)
	n   int    // buf[:n] is read and not yet consumed
	// armed is when the read deadline was last set to bufIdle ahead: a
	// busy channel re-arms it only every bufIdle/2, not per command.
	armed time.Time
	// resumed: the channel waited for its next command while idle (in
	// a Parker or in waitReady) and is readable.
	resumed bool
}

// first reads the first bytes of the next command, waiting without a
// deadline of its own but letting ctx interrupt. A reader with no command
// for about bufIdle gives its buffer back and returns errIdle: its server
// waits for the next command's bytes without it (parked, or waitReady),
// and calls again with resumed set; it then takes a new buffer.
func (r *cmdReader) first(ctx context.Context) (int, error) {
	if r.buf != nil {
		if now := time.Now(); now.Sub(r.armed) > bufIdle/2 {
			r.c.SetReadDeadline(now.Add(bufIdle))
			r.armed = now
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		m, err := r.c.Read(r.buf)
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		if m > 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return m, err
		}
		r.buf = nil // idle for at least bufIdle/2
	}
	if !r.resumed {
		return 0, errIdle
	}
	r.resumed = false
	if err := waitReady(ctx, r.c, false); err != nil {
		return 0, err
	}
	r.armed = time.Time{}
	r.buf = make([]byte, MaxBufferSize+1)
	return r.c.Read(r.buf)
}

// next returns the next command, or nil for a malformed one (shorter than
// a header, a size field below 10 or above limit, or its bytes not
// arriving within dataPartialTimeout), whose bytes it drops.
func (r *cmdReader) next(ctx context.Context, limit int) ([]byte, error) {
	if r.n == 0 {
		m, err := r.first(ctx)
		if err != nil {
			return nil, err
		}
		r.n = m
	}
	for r.n < headerSize {
		if ok, err := r.more(); err != nil || !ok {
			r.n = 0
			return nil, err
		}
	}
	size := int(binary.BigEndian.Uint32(r.buf[2:6]))
	if size < headerSize || size > limit {
		r.n = 0 // QEMU sends min(size, buffer) bytes, all read by now
		return nil, nil
	}
	for r.n < size {
		if ok, err := r.more(); err != nil || !ok {
			r.n = 0
			return nil, err
		}
	}
	cmd := make([]byte, size)
	copy(cmd, r.buf[:size])
	r.n = copy(r.buf, r.buf[size:r.n])
	return cmd, nil
}

// more reads more bytes of a started command; false on timeout. A
// cancellation of the serving context (which sets a past read deadline)
// does not cut a started command short: it is read to its end, within
// the partial-command timeout, so a handover never splits one.
func (r *cmdReader) more() (bool, error) {
	if r.n == len(r.buf) {
		return false, nil
	}
	until := time.Now().Add(dataPartialTimeout)
	for {
		r.c.SetReadDeadline(until)
		m, err := r.c.Read(r.buf[r.n:])
		r.n += m
		if m > 0 {
			return true, nil
		}
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if time.Now().Before(until) {
				continue // the context's cancellation, not our timeout
			}
			return false, nil
		}
		return false, err
	}
}
