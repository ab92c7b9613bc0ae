package tpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// maxResponseSize bounds a TPM response. TPMs answer with at most a few KiB
// (MAX_RESPONSE_SIZE is 4096 in the reference implementation and libtpms);
// the slack only guards against garbage size fields.
const maxResponseSize = 1 << 16

// headerSize is the size of a TPM command or response header: tag (2),
// size (4), command or response code (4).
const headerSize = 10

// conn moves raw TPM command bytes to a TPM and returns its raw response. The
// returned slice may be reused by the next send. conn is not safe for
// concurrent use: dev serializes it.
type conn interface {
	send(ctx context.Context, cmd []byte) ([]byte, error)
	close() error
}

// pastDeadline is a deadline in the past: setting it makes blocked I/O on a
// net.Conn or pollable file return at once.
func pastDeadline() time.Time { return time.Unix(1, 0) }

// deadliner is the part of net.Conn and *os.File that interrupts I/O.
type deadliner interface {
	SetDeadline(t time.Time) error
}

// watch arranges for blocked I/O on d to be interrupted when ctx is done. The
// returned stop ends the watch and reports whether it fired; once stop has
// returned, d's deadline is cleared again either way. For contexts that can
// never be done it costs nothing.
func watch(ctx context.Context, d deadliner) (stop func() (fired bool)) {
	if ctx.Done() == nil {
		return func() bool { return false }
	}
	done := make(chan struct{})
	unregister := context.AfterFunc(ctx, func() {
		_ = d.SetDeadline(pastDeadline())
		close(done)
	})
	return func() bool {
		if unregister() {
			return false
		}
		<-done // the callback may still be running: let it finish first
		_ = d.SetDeadline(time.Time{})
		return true
	}
}

// readResponse reads exactly one TPM response from r into buf (grown if
// needed): the 10-byte header, then exactly size-10 more bytes. It never
// assumes one Read returns a whole response.
func readResponse(r io.Reader, buf []byte) ([]byte, error) {
	if cap(buf) < headerSize {
		buf = make([]byte, 0, 4096)
	}
	buf = buf[:headerSize]
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("read response header: %w", err)
	}
	size := binary.BigEndian.Uint32(buf[2:6])
	if size < headerSize || size > maxResponseSize {
		return nil, fmt.Errorf("response header claims %d bytes (tag 0x%04x); want %d..%d", size, binary.BigEndian.Uint16(buf[0:2]), headerSize, maxResponseSize)
	}
	if cap(buf) < int(size) {
		nb := make([]byte, size)
		copy(nb, buf)
		buf = nb
	}
	buf = buf[:size]
	if _, err := io.ReadFull(r, buf[headerSize:]); err != nil {
		return nil, fmt.Errorf("read response body (%d of %d bytes expected): %w", size-headerSize, size, err)
	}
	return buf, nil
}

// streamConn speaks raw TPM commands over a stream socket: swtpm's --server
// channel (TCP or unix). After any transport error the connection is left
// unusable (a half-read response would desynchronize the stream) and says so.
type streamConn struct {
	c       net.Conn
	desc    string
	buf     []byte
	broken  error
	network string
	addr    string
}

// dialStream connects to a swtpm server socket.
func dialStream(ctx context.Context, network, addr string) (*streamConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("connect to swtpm at %s %s: %w", network, addr, err)
	}
	return &streamConn{c: c, desc: "swtpm " + network + " " + addr, buf: make([]byte, 0, 4096), network: network, addr: addr}, nil
}

// redial replaces a broken connection with a new one. swtpm keeps its state
// (PCRs, loaded objects) across client connections, so the bridge carries on
// where it was; it serves one client at a time, so the old connection is
// closed first.
func (s *streamConn) redial(ctx context.Context) error {
	s.c.Close()
	var d net.Dialer
	c, err := d.DialContext(ctx, s.network, s.addr)
	if err != nil {
		return fmt.Errorf("%s: reconnect after %v: %w", s.desc, s.broken, err)
	}
	s.c, s.broken = c, nil
	return nil
}

func (s *streamConn) send(ctx context.Context, cmd []byte) ([]byte, error) {
	if s.broken != nil {
		if err := s.redial(ctx); err != nil {
			return nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", s.desc, err)
	}
	stop := watch(ctx, s.c)
	rsp, err := s.roundTrip(cmd)
	fired := stop()
	if err == nil {
		// Complete, even if ctx ended meanwhile: the stream is in step.
		return rsp, nil
	}
	if fired {
		// Our own deadline interrupted the I/O: report why, and give up on
		// the stream, which may hold half a response.
		err = fmt.Errorf("%w (interrupted: %v)", ctx.Err(), err)
	}
	s.broken = err
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("%s: swtpm closed the connection (did it exit?): %w", s.desc, err)
	}
	return nil, fmt.Errorf("%s: %w", s.desc, err)
}

func (s *streamConn) roundTrip(cmd []byte) ([]byte, error) {
	if _, err := s.c.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	rsp, err := readResponse(s.c, s.buf)
	if err != nil {
		return nil, err
	}
	s.buf = rsp[:0]
	return rsp, nil
}

func (s *streamConn) close() error { return s.c.Close() }

// deviceConn talks to a kernel TPM character device (/dev/tpmrm0). The
// kernel takes a whole command per write and returns the whole response to
// the first read; readResponse copes with partial reads anyway.
type deviceConn struct {
	f    *os.File
	path string
	buf  []byte
}

// openDevice opens a TPM character device for reading and writing.
func openDevice(path string) (*deviceConn, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("open TPM device: %w", err)
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		return nil, fmt.Errorf("open TPM device %s: not a character device (mode %s)", path, fi.Mode())
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open TPM device: %w", err)
	}
	return &deviceConn{f: f, path: path, buf: make([]byte, 0, 8192)}, nil
}

func (d *deviceConn) send(ctx context.Context, cmd []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", d.path, err)
	}
	// The TPM driver supports poll, so deadlines usually work; where they do
	// not (os.ErrNoDeadline) the command simply runs to completion.
	stop := watch(ctx, d.f)
	rsp, err := d.roundTrip(cmd)
	if fired := stop(); fired && err != nil {
		err = fmt.Errorf("%w (interrupted: %v)", ctx.Err(), err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", d.path, err)
	}
	return rsp, nil
}

func (d *deviceConn) roundTrip(cmd []byte) ([]byte, error) {
	if _, err := d.f.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	// One large read first: kernels before partial-read support discard
	// whatever a short read leaves. Then finish by the header's size.
	buf := d.buf[:cap(d.buf)]
	n, err := d.f.Read(buf)
	if n == 0 && (err == nil || errors.Is(err, io.EOF)) {
		return nil, errors.New("read response: no data (is this a TPM device?)")
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read response: %w", err)
	}
	rsp, err := readResponse(io.MultiReader(bytes.NewReader(buf[:n]), d.f), make([]byte, 0, n))
	if err != nil {
		return nil, err
	}
	return rsp, nil
}

func (d *deviceConn) close() error { return d.f.Close() }
