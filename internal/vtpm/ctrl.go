package vtpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Control-channel command codes (swtpm-ioctls(3), QEMU's tpm_ioctl.h). On
// the socket a command is its code as a big-endian u32 followed by the
// request structure; the answer is the response structure. All fields are
// big-endian.
const (
	cmdGetCapability       uint32 = 1
	cmdInit                uint32 = 2
	cmdShutdown            uint32 = 3
	cmdGetTPMEstablished   uint32 = 4
	cmdSetLocality         uint32 = 5
	cmdHashStart           uint32 = 6
	cmdHashData            uint32 = 7
	cmdHashEnd             uint32 = 8
	cmdCancelTPMCmd        uint32 = 9
	cmdStoreVolatile       uint32 = 10
	cmdResetTPMEstablished uint32 = 11
	cmdGetStateBlob        uint32 = 12
	cmdSetStateBlob        uint32 = 13
	cmdStop                uint32 = 14
	cmdGetConfig           uint32 = 15
	cmdSetDataFD           uint32 = 16
	cmdSetBufferSize       uint32 = 17
)

// Control-channel result codes: TPM 1.2 error codes, as swtpm returns them.
const (
	ptmSuccess      uint32 = 0
	ptmBadParameter uint32 = 3
	ptmFail         uint32 = 9
	ptmBadOrdinal   uint32 = 10
	ptmIOError      uint32 = 0x1F
	ptmBadLocality  uint32 = 0x3D
)

// PTM_CAP_* bits of CMD_GET_CAPABILITY.
const (
	capInit                = 1 << 0
	capShutdown            = 1 << 1
	capGetTPMEstablished   = 1 << 2
	capSetLocality         = 1 << 3
	capHashing             = 1 << 4
	capCancelTPMCmd        = 1 << 5
	capStoreVolatile       = 1 << 6
	capResetTPMEstablished = 1 << 7
	capGetStateBlob        = 1 << 8
	capSetStateBlob        = 1 << 9
	capStop                = 1 << 10
	capGetConfig           = 1 << 11
	capSetDataFD           = 1 << 12
	capSetBufferSize       = 1 << 13
)

// ControlCapabilities is what CMD_GET_CAPABILITY reports. It covers QEMU's
// minimum for a TPM 2.0 (INIT, SHUTDOWN, GET_TPMESTABLISHED, SET_LOCALITY,
// RESET_TPMESTABLISHED, SET_DATAFD, STOP, SET_BUFFERSIZE) plus CANCEL,
// STORE_VOLATILE, GET_CONFIG and GET/SET_STATEBLOB (live migration: the
// blobs carry no PCR state, which moves through the bridges' authenticated
// handover; migrate.go). It leaves out HASHING (the locality-4 D-RTM hash
// interface).
const ControlCapabilities uint64 = capInit | capShutdown | capGetTPMEstablished | capSetLocality |
	capCancelTPMCmd | capStoreVolatile | capResetTPMEstablished | capStop | capGetConfig |
	capSetDataFD | capSetBufferSize | capGetStateBlob | capSetStateBlob

// Limits of the control channel.
const (
	// ctrlBodyMax is the largest fixed request read with a command
	// (CMD_HASH_DATA: a u32 length and 4096 bytes).
	ctrlBodyMax = 4 + 4096
	// ctrlPartialTimeout bounds the wait for the rest of a request whose
	// first bytes arrived (swtpm allows 500 ms).
	ctrlPartialTimeout = time.Second
	// maxDiscardBlob is the largest CMD_SET_STATEBLOB body read and
	// dropped; a larger one closes the connection.
	maxDiscardBlob = 16 << 20
)

// ServeControl serves the swtpm control channel on ctrl, QEMU's
// connection to the VM's vTPM socket, until the peer closes it (nil), an
// I/O error (returned), or ctx ends (ctx.Err(); ctrl and the data
// connection stay open, so a new process can take them over). A data
// socket passed with CMD_SET_DATAFD is served by ServeData; ServeControl
// returns only after that has ended too. ctrl may come from a listener or
// from outside (an fd kept in systemd's FDSTORE, or inherited across a
// re-exec); the caller closes it.
func (v *VTPM) ServeControl(parent context.Context, ctrl *net.UnixConn) error {
	ch := make(chan error, 1)
	v.StartControl(parent, ctrl, func(err error) { ch <- err })
	return <-ch
}

// StartControl serves ctrl as ServeControl does, in the background, and
// calls done with ServeControl's result when it would have returned. With
// a Config.Parker, an idle control channel (and its data channel) holds
// no goroutine: a bridge serving many VMs starts their vTPMs with it
// rather than with a goroutine each blocked in ServeControl.
func (v *VTPM) StartControl(parent context.Context, ctrl *net.UnixConn, done func(error)) {
	// The data channel is served with the same context: it ends before
	// the control channel's server does (on a hang-up it is shut first),
	// so it needs no context of its own, and the VM has one context less.
	s := &ctrlSession{v: v, ctx: parent, ctrl: ctrl, done: done}
	v.mu.Lock()
	v.ctrl = ctrl
	v.mu.Unlock()
	s.stop = context.AfterFunc(parent, s.interrupt)
	go s.run()
}

// ctrlSession is one served control channel: what its loop keeps while
// the channel is parked.
type ctrlSession struct {
	v    *VTPM
	ctx  context.Context
	ctrl *net.UnixConn
	wg   sync.WaitGroup // the data channel's server
	// The buffers go after bufIdle without a command (QEMU sends a few at
	// start-up and reset, then none for hours).
	buf, oob []byte
	resumed  bool // the idle channel is readable (parked or waited)
	// stop ends the cancellation's AfterFunc (interrupt), registered
	// while a goroutine serves (a parked channel has the Parker's).
	stop func() bool
	done func(error)
}

// interrupt is the convention by which a cancellation reaches a read in
// progress: a past read deadline.
func (s *ctrlSession) interrupt() { s.ctrl.SetReadDeadline(time.Now()) }

// run serves until the channel ends or parks.
func (s *ctrlSession) run() {
	for {
		err := s.serve()
		if err == errIdle {
			s.stop()
			if s.v.park(s.ctx, s.ctrl, s.resume) {
				return
			}
			s.stop = context.AfterFunc(s.ctx, s.interrupt)
			waitReady(s.ctx, s.ctrl, true) // an error shows in the read
			s.resumed = true
			continue
		}
		s.stop()
		if s.ctx.Err() == nil {
			// The control peer is gone (not a handover): so is the VM,
			// or the peer was not QEMU. End the data channel with it.
			if d := s.v.DataConn(); d != nil {
				endData(d)
			}
			s.v.mu.Lock()
			if s.v.ctrl == s.ctrl {
				s.v.ctrl = nil
			}
			s.v.mu.Unlock()
		}
		s.wg.Wait()
		s.done(err)
		return
	}
}

// resume goes on serving a channel its Parker woke.
func (s *ctrlSession) resume() {
	s.resumed = true
	s.stop = context.AfterFunc(s.ctx, s.interrupt)
	s.run()
}

// endData ends the data channel d from the control side. Its read side is
// shut, which wakes its server wherever it waits (in a read, or parked: a
// parked socket that were closed would leave the Parker without a word),
// and the server, seeing the end, closes it.
func endData(d net.Conn) {
	if cr, ok := d.(interface{ CloseRead() error }); ok && cr.CloseRead() == nil {
		return
	}
	d.Close()
}

// serve reads and answers control commands until an error, the channel's
// end, or its idle time (errIdle).
func (s *ctrlSession) serve() error {
	v, ctx, ctrl := s.v, s.ctx, s.ctrl
	for {
		var err error
		if s.resumed {
			s.resumed = false
			err = waitReady(ctx, ctrl, false)
		} else {
			err = waitBusy(ctx, ctrl, &s.buf, &s.oob)
		}
		if err == errIdle {
			return err
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("vtpm: wait on control channel: %w", err)
		}
		if s.buf == nil {
			s.buf, s.oob = make([]byte, 4+ctrlBodyMax), make([]byte, unix.CmsgSpace(4*8))
		}
		buf := s.buf
		n, oobn, _, _, err := ctrl.ReadMsgUnix(buf, s.oob)
		fds := receivedFDs(s.oob[:oobn])
		if err != nil {
			closeAll(fds)
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("vtpm: read control channel: %w", err)
		}
		if n == 0 {
			closeAll(fds)
			return nil
		}
		msg := buf[:n]
		for len(msg) < 4 {
			m, err := v.readMore(ctrl, buf[len(msg):4])
			if err != nil {
				closeAll(fds)
				return fmt.Errorf("vtpm: control channel: truncated command: %w", err)
			}
			msg = buf[:len(msg)+m]
		}
		code := binary.BigEndian.Uint32(msg)
		body := msg[4:]
		if need := ctrlBodySize(code, body); need > len(body) {
			for len(body) < need {
				m, err := v.readMore(ctrl, buf[4+len(body):4+need])
				if err != nil {
					closeAll(fds)
					return fmt.Errorf("vtpm: control channel: truncated command %d: %w", code, err)
				}
				body = buf[4 : 4+len(body)+m]
			}
		}
		resp, err := v.control(ctx, ctrl, code, body, &fds, &s.wg)
		closeAll(fds)
		if err != nil {
			return err
		}
		if v.trace != nil {
			v.trace(true, code, binary.BigEndian.Uint32(resp))
		}
		if _, err := ctrl.Write(resp); err != nil {
			return fmt.Errorf("vtpm: write control response: %w", err)
		}
	}
}

// readMore reads into b with the partial-request deadline.
func (v *VTPM) readMore(c net.Conn, b []byte) (int, error) {
	c.SetReadDeadline(time.Now().Add(ctrlPartialTimeout))
	defer c.SetReadDeadline(time.Time{})
	return c.Read(b)
}

// ctrlBodySize is the request size a command needs (as swtpm reads it);
// bytes beyond it in the same message (QEMU pads SET_LOCALITY's one byte to
// four) are ignored.
func ctrlBodySize(code uint32, body []byte) int {
	switch code {
	case cmdInit, cmdSetBufferSize:
		return 4
	case cmdSetLocality, cmdResetTPMEstablished:
		return 1
	case cmdGetStateBlob:
		return 12
	case cmdSetStateBlob:
		return 12 // the blob follows; it is drained separately
	case cmdHashData:
		if len(body) < 4 {
			return 4
		}
		return 4 + int(min(binary.BigEndian.Uint32(body), 4096))
	}
	return 0
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

// control executes one control command and returns its response.
func (v *VTPM) control(ctx context.Context, ctrl *net.UnixConn, code uint32, body []byte, fds *[]int, wg *sync.WaitGroup) ([]byte, error) {
	switch code {
	case cmdGetCapability:
		return binary.BigEndian.AppendUint64(nil, ControlCapabilities), nil
	case cmdInit:
		if len(body) < 4 {
			return be32(ptmBadParameter), nil
		}
		// init_flags: DELETE_VOLATILE after state blobs is the resume of a
		// migrated vTPM (migrate.go); otherwise there is nothing to delete.
		return be32(v.init(ctx, binary.BigEndian.Uint32(body))), nil
	case cmdShutdown, cmdStop:
		v.Stop()
		return be32(ptmSuccess), nil
	case cmdGetTPMEstablished:
		// No D-RTM (_TPM_Hash_Start) exists here, so the flag is clear.
		return append(be32(ptmSuccess), 0, 0, 0, 0), nil
	case cmdSetLocality:
		if len(body) < 1 {
			return be32(ptmBadParameter), nil
		}
		return be32(v.SetLocality(body[0])), nil
	case cmdResetTPMEstablished:
		if len(body) < 1 {
			return be32(ptmBadParameter), nil
		}
		if body[0] != 3 && body[0] != 4 {
			return be32(ptmBadLocality), nil
		}
		return be32(ptmSuccess), nil
	case cmdCancelTPMCmd:
		// Commands do not run long enough to cancel; a journal wait is not
		// cancellable (the record may already be durable).
		return be32(ptmSuccess), nil
	case cmdStoreVolatile:
		// The state is always in the journal; nothing to store.
		return be32(ptmSuccess), nil
	case cmdGetConfig:
		return append(be32(ptmSuccess), be32(0)...), nil
	case cmdSetBufferSize:
		if len(body) < 4 {
			return be32(ptmBadParameter), nil
		}
		n := v.SetBufferSize(binary.BigEndian.Uint32(body))
		resp := be32(ptmSuccess)
		resp = binary.BigEndian.AppendUint32(resp, n)
		resp = binary.BigEndian.AppendUint32(resp, MinBufferSize)
		return binary.BigEndian.AppendUint32(resp, MaxBufferSize), nil
	case cmdGetStateBlob:
		return v.getStateBlob(body), nil
	case cmdSetStateBlob:
		if len(body) < 12 {
			return be32(ptmBadParameter), nil
		}
		typ := binary.BigEndian.Uint32(body[4:8])
		length := int64(binary.BigEndian.Uint32(body[8:12]))
		blob := append([]byte(nil), body[12:]...) // bytes that came with the header
		if length > maxDiscardBlob {
			return nil, fmt.Errorf("vtpm: control channel: state blob of %d bytes; closing", length)
		}
		rest := max(length-int64(len(blob)), 0)
		ctrl.SetReadDeadline(time.Now().Add(10 * time.Second))
		var err error
		if length <= maxStateBlob {
			blob = append(blob, make([]byte, rest)...)
			_, err = io.ReadFull(ctrl, blob[len(blob)-int(rest):])
		} else {
			_, err = io.CopyN(io.Discard, ctrl, rest)
		}
		ctrl.SetReadDeadline(time.Time{})
		if err != nil {
			return nil, fmt.Errorf("vtpm: control channel: read state blob: %w", err)
		}
		if length > maxStateBlob {
			v.log.Warn("vtpm: CMD_SET_STATEBLOB refused: a state blob this large is not a tpmmux vTPM's (migrating from swtpm is not supported)", "bytes", length)
			return be32(ptmBadParameter), nil
		}
		if int64(len(blob)) > length {
			blob = blob[:length]
		}
		return be32(v.setStateBlob(typ, blob)), nil
	case cmdHashStart, cmdHashData, cmdHashEnd:
		// The locality-4 hash interface (D-RTM) is not implemented (not
		// advertised; QEMU never sends it).
		return be32(ptmBadOrdinal), nil
	case cmdSetDataFD:
		if len(*fds) != 1 {
			v.log.Warn("vtpm: CMD_SET_DATAFD without exactly one fd", "fds", len(*fds))
			return be32(ptmBadParameter), nil
		}
		fd := (*fds)[0]
		*fds = nil
		conn, err := fdConn(fd)
		if err != nil {
			v.log.Warn("vtpm: CMD_SET_DATAFD: not a socket", "err", err)
			return be32(ptmBadParameter), nil
		}
		if !v.claimData(conn) {
			conn.Close()
			return be32(ptmIOError), nil
		}
		// A new data socket is a new QEMU process: its TPM is off until
		// its CMD_INIT (as a freshly started swtpm), whatever the phase
		// restored from the journal of the VM's earlier runs.
		v.Stop()
		if v.inf != nil {
			// Nobody waits for an answer to an older command.
			if err := v.inf.Done(); err != nil {
				v.log.Error("vtpm: clear in-flight record", "err", err)
			}
		}
		wg.Add(1)
		v.startData(ctx, conn, func(err error) {
			if err != nil && ctx.Err() == nil {
				v.log.Warn("vtpm: data channel ended", "err", err)
			}
			wg.Done()
		})
		return be32(ptmSuccess), nil
	}
	v.log.Warn("vtpm: unknown control command", "code", code)
	return be32(ptmBadOrdinal), nil
}

// receivedFDs extracts the fds of SCM_RIGHTS messages.
func receivedFDs(oob []byte) []int {
	if len(oob) == 0 {
		return nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for _, m := range msgs {
		if f, err := unix.ParseUnixRights(&m); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// fdConn makes a net.Conn of a received socket fd (and takes the fd).
func fdConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "vtpm-data")
	defer f.Close() // FileConn dups it
	return net.FileConn(f)
}

// ControlConn returns the control connection being served, or the one
// whose serving stopped because its context ended (nil once its peer hung
// up): with DataConn, what a bridge hands over to the process that
// replaces it, for example in systemd's FDSTORE.
func (v *VTPM) ControlConn() *net.UnixConn {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.ctrl
}

// ServeListener accepts control connections on l and serves them one at a
// time with ServeControl (as swtpm does: QEMU connects once per VM run),
// until ctx ends or l fails. A connection whose peer hung up is closed; on
// ctx's end the current one stays open for a handover.
func (v *VTPM) ServeListener(ctx context.Context, l *net.UnixListener) error {
	ch := make(chan error, 1)
	v.StartListener(ctx, l, func(err error) { ch <- err })
	return <-ch
}

// StartListener serves l as ServeListener does, in the background, and
// calls done with ServeListener's result. With a Config.Parker, a vTPM
// waiting for QEMU's connection, or served and idle, holds no goroutine.
// A parked listener closed by its owner ends when ctx ends.
func (v *VTPM) StartListener(ctx context.Context, l *net.UnixListener, done func(error)) {
	s := &listenSession{v: v, ctx: ctx, l: l, done: done}
	go s.run()
}

// listenSession is one served listener.
type listenSession struct {
	v       *VTPM
	ctx     context.Context
	l       *net.UnixListener
	resumed bool // a connection is pending (or ctx ended)
	done    func(error)
}

// run accepts the next connection and starts serving it, or parks.
func (s *listenSession) run() {
	if !s.resumed && s.v.park(s.ctx, s.l, s.resume) {
		return
	}
	s.resumed = false
	// A cancellation interrupts the accept by a past deadline.
	stop := context.AfterFunc(s.ctx, func() { s.l.SetDeadline(time.Now()) })
	c, err := s.l.AcceptUnix()
	stop()
	if err != nil {
		if s.ctx.Err() != nil {
			err = s.ctx.Err()
		} else {
			err = fmt.Errorf("vtpm: accept control connection: %w", err)
		}
		s.done(err)
		return
	}
	s.v.StartControl(s.ctx, c, func(err error) {
		if s.ctx.Err() != nil {
			s.done(s.ctx.Err())
			return
		}
		c.Close()
		if err != nil {
			s.v.log.Warn("vtpm: control connection ended", "err", err)
		}
		s.run()
	})
}

// resume goes on accepting once its Parker saw a connection pending.
func (s *listenSession) resume() {
	s.resumed = true
	s.run()
}
