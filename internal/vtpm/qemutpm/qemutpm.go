// Package qemutpm is the QEMU side of a TPM emulator backend: it connects
// to a vTPM's control socket (swtpm's control-channel protocol, which the
// bridge's vTPM and swtpm both serve), hands a data socket over with
// CMD_SET_DATAFD, initializes the TPM with CMD_INIT and then sends the
// guest's TPM commands over the data socket one at a time, as QEMU 7.2's
// tpm_emulator backend does. Benchmarks use it to measure a vTPM from where
// QEMU stands (the guest-visible latency of a command), against the bridge
// and against swtpm alike.
package qemutpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Control channel command codes (QEMU's backends/tpm/tpm_ioctl.h).
const (
	cmdInit      = 2
	cmdSetDataFD = 16
)

// maxResponse bounds a TPM response read from the data socket (the
// buffer size both vTPMs negotiate is at most 4096 bytes).
const maxResponse = 4096

// Conn is one vTPM as QEMU holds it: the control connection and the data
// socket. It is not safe for concurrent use: like a guest's TPM driver, it
// sends one command and reads its response before the next.
type Conn struct {
	ctrl *net.UnixConn
	data net.Conn
	buf  []byte
}

// Dial connects to the vTPM control socket at path as QEMU does when a
// domain starts: it waits (until ctx ends) for the socket to accept, hands
// over one end of a new socket pair with CMD_SET_DATAFD and initializes
// the TPM with CMD_INIT. The TPM then waits for the guest's TPM2_Startup
// (Startup).
func Dial(ctx context.Context, path string) (*Conn, error) {
	var ctrl *net.UnixConn
	for {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err == nil {
			ctrl = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to vtpm %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	c := &Conn{ctrl: ctrl, buf: make([]byte, maxResponse)}
	if err := c.handshake(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("vtpm %s: %w", path, err)
	}
	return c, nil
}

func (c *Conn) handshake(ctx context.Context) error {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("data socket pair: %w", err)
	}
	err = c.control(ctx, cmdSetDataFD, nil, unix.UnixRights(fds[1]))
	unix.Close(fds[1])
	if err != nil {
		unix.Close(fds[0])
		return fmt.Errorf("CMD_SET_DATAFD: %w", err)
	}
	f := os.NewFile(uintptr(fds[0]), "vtpm-data")
	c.data, err = net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("data socket: %w", err)
	}
	if err := c.control(ctx, cmdInit, []byte{0, 0, 0, 0}, nil); err != nil {
		return fmt.Errorf("CMD_INIT: %w", err)
	}
	return nil
}

// control sends one control command whose answer is a bare 4-byte result
// and checks that the result is 0 (success).
func (c *Conn) control(ctx context.Context, code uint32, body, oob []byte) error {
	msg := append(binary.BigEndian.AppendUint32(nil, code), body...)
	setDeadline(ctx, c.ctrl)
	defer c.ctrl.SetDeadline(time.Time{})
	if _, _, err := c.ctrl.WriteMsgUnix(msg, oob, nil); err != nil {
		return err
	}
	var res [4]byte
	if _, err := io.ReadFull(c.ctrl, res[:]); err != nil {
		return fmt.Errorf("read result: %w", err)
	}
	if r := binary.BigEndian.Uint32(res[:]); r != 0 {
		return fmt.Errorf("result %#x", r)
	}
	return nil
}

// Command sends one TPM command over the data socket and returns its whole
// response, valid until the next call. It fails on a malformed response
// header, not on a TPM error code (RC reads that).
func (c *Conn) Command(ctx context.Context, cmd []byte) ([]byte, error) {
	setDeadline(ctx, c.data)
	defer c.data.SetDeadline(time.Time{})
	if _, err := c.data.Write(cmd); err != nil {
		return nil, fmt.Errorf("send TPM command: %w", err)
	}
	if _, err := io.ReadFull(c.data, c.buf[:10]); err != nil {
		return nil, fmt.Errorf("read TPM response header: %w", err)
	}
	n := binary.BigEndian.Uint32(c.buf[2:6])
	if n < 10 || n > maxResponse {
		return nil, fmt.Errorf("TPM response of %d bytes (want 10 to %d)", n, maxResponse)
	}
	if _, err := io.ReadFull(c.data, c.buf[10:n]); err != nil {
		return nil, fmt.Errorf("read TPM response: %w", err)
	}
	return c.buf[:n], nil
}

// Run sends cmd and fails unless the TPM answers TPM_RC_SUCCESS.
func (c *Conn) Run(ctx context.Context, cmd []byte) error {
	resp, err := c.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if rc := RC(resp); rc != 0 {
		return fmt.Errorf("TPM command %#x: response code %#x", binary.BigEndian.Uint32(cmd[6:10]), rc)
	}
	return nil
}

// Startup sends TPM2_Startup(TPM_SU_CLEAR), as the firmware of a booting
// guest does first.
func (c *Conn) Startup(ctx context.Context) error {
	return c.Run(ctx, StartupClear)
}

// Close closes the data socket and the control connection, as QEMU does
// when the domain stops.
func (c *Conn) Close() error {
	var err error
	if c.data != nil {
		err = c.data.Close()
	}
	return errors.Join(err, c.ctrl.Close())
}

func setDeadline(ctx context.Context, c net.Conn) {
	d, ok := ctx.Deadline()
	if !ok {
		d = time.Now().Add(30 * time.Second)
	}
	c.SetDeadline(d)
}

// RC returns the response code of a TPM response (0 for one too short to
// hold one: Command never returns such).
func RC(resp []byte) uint32 {
	if len(resp) < 10 {
		return 0
	}
	return binary.BigEndian.Uint32(resp[6:10])
}

// StartupClear is TPM2_Startup(TPM_SU_CLEAR).
var StartupClear = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}

// Extend returns a TPM2_PCR_Extend of pcr with one digest per bank, in the
// order given: what Linux IMA sends for a measurement on a TPM with sha1
// and sha256 banks (ExtendIMA). Each digest's length must match its
// algorithm (20 bytes for sha1 0x0004, 32 for sha256 0x000B, …).
func Extend(pcr uint32, digests ...Digest) []byte {
	var c []byte
	c = binary.BigEndian.AppendUint16(c, 0x8002) // TPM_ST_SESSIONS
	c = binary.BigEndian.AppendUint32(c, 0)      // size, set below
	c = binary.BigEndian.AppendUint32(c, 0x182)  // TPM_CC_PCR_Extend
	c = binary.BigEndian.AppendUint32(c, pcr)
	c = binary.BigEndian.AppendUint32(c, 9)          // authorization area size
	c = binary.BigEndian.AppendUint32(c, 0x40000009) // TPM_RS_PW
	c = append(c, 0, 0, 1, 0, 0)                     // empty nonce, continueSession, empty password
	c = binary.BigEndian.AppendUint32(c, uint32(len(digests)))
	for _, d := range digests {
		c = binary.BigEndian.AppendUint16(c, d.Alg)
		c = append(c, d.Value...)
	}
	binary.BigEndian.PutUint32(c[2:], uint32(len(c)))
	return c
}

// Digest is one bank's digest of an extend.
type Digest struct {
	Alg   uint16 // TPM_ALG_ID
	Value []byte
}

// ExtendIMA is an extend of PCR 10 in the sha1 and sha256 banks, the
// first 20 and all 32 bytes of d: the command a Linux guest's IMA sends
// for each measurement on a two-bank TPM.
func ExtendIMA(d [32]byte) []byte {
	return Extend(10, Digest{Alg: 0x0004, Value: d[:20]}, Digest{Alg: 0x000B, Value: d[:]})
}

// DataConn is the data socket, for callers that write raw or malformed
// bytes themselves (tests of a vTPM's parser); Command is the normal way.
func (c *Conn) DataConn() net.Conn { return c.data }
