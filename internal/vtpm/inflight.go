package vtpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// Inflight keeps the TPM command the vTPM is executing where it survives the
// process, so that a process taking over the data socket after a crash
// (kill -9 of the bridge) can finish it: the dead process had already read
// the command from the socket, and QEMU waits for its answer.
//
// Begin is called (with the vTPM locked) before the command executes, with
// the journal's Seq at that moment; Done after its answer is written. A
// command's journal event, if it makes one, is therefore Seq+1, and nothing
// else can be journaled between Begin and that event.
type Inflight interface {
	// Begin records cmd and the journal Seq before it.
	Begin(seq uint64, cmd []byte) error
	// Done records that the answer has been written.
	Done() error
	// Pending returns the command recorded by a Begin without a Done.
	Pending() (seq uint64, cmd []byte, ok bool, err error)
	// SetLocality records the locality QEMU last set (QEMU caches it and
	// does not set it again for a new process).
	SetLocality(l uint8) error
	// Locality returns the recorded locality (0 if none was set).
	Locality() (uint8, error)
}

// FileInflight is an Inflight in a file: a memfd kept in systemd's FDSTORE
// next to the VM's sockets, or a file under /run. It survives the process,
// not the host (when the host goes, so does the VM). Each command costs
// three small pwrites and no fsync.
type FileInflight struct {
	f *os.File
}

// Layout: magic(8) state(1) locality(1) pad(6) seq(8) len(4) cmd(len).
const (
	inflightMagic  = "VTPMINF1"
	inflightHeader = 8 + 8 + 8 + 4
)

// NewFileInflight uses f (read-write) as the in-flight record, formatting it
// if it is empty and keeping a pending command if it has one.
func NewFileInflight(f *os.File) (*FileInflight, error) {
	var magic [8]byte
	_, err := f.ReadAt(magic[:], 0)
	switch {
	case errors.Is(err, io.EOF):
		hdr := make([]byte, inflightHeader)
		copy(hdr, inflightMagic)
		if _, err := f.WriteAt(hdr, 0); err != nil {
			return nil, fmt.Errorf("vtpm: format in-flight record %s: %w", f.Name(), err)
		}
	case err != nil:
		return nil, fmt.Errorf("vtpm: read in-flight record %s: %w", f.Name(), err)
	case string(magic[:]) != inflightMagic:
		return nil, fmt.Errorf("vtpm: %s is not a vTPM in-flight record (bad magic); remove it or pass an empty file", f.Name())
	}
	return &FileInflight{f: f}, nil
}

// Begin implements Inflight.
func (fi *FileInflight) Begin(seq uint64, cmd []byte) error {
	b := make([]byte, 12+len(cmd))
	binary.BigEndian.PutUint64(b, seq)
	binary.BigEndian.PutUint32(b[8:], uint32(len(cmd)))
	copy(b[12:], cmd)
	if _, err := fi.f.WriteAt(b, 16); err != nil {
		return fmt.Errorf("vtpm: write in-flight command: %w", err)
	}
	if _, err := fi.f.WriteAt([]byte{1}, 8); err != nil {
		return fmt.Errorf("vtpm: mark in-flight command: %w", err)
	}
	return nil
}

// Done implements Inflight.
func (fi *FileInflight) Done() error {
	if _, err := fi.f.WriteAt([]byte{0}, 8); err != nil {
		return fmt.Errorf("vtpm: clear in-flight command: %w", err)
	}
	return nil
}

// Pending implements Inflight.
func (fi *FileInflight) Pending() (uint64, []byte, bool, error) {
	hdr := make([]byte, inflightHeader)
	if _, err := fi.f.ReadAt(hdr, 0); err != nil {
		return 0, nil, false, fmt.Errorf("vtpm: read in-flight record: %w", err)
	}
	if hdr[8] != 1 {
		return 0, nil, false, nil
	}
	seq := binary.BigEndian.Uint64(hdr[16:])
	n := binary.BigEndian.Uint32(hdr[24:])
	if n < headerSize || n > MaxBufferSize {
		return 0, nil, false, fmt.Errorf("vtpm: in-flight record holds a command of %d bytes", n)
	}
	cmd := make([]byte, n)
	if _, err := fi.f.ReadAt(cmd, inflightHeader); err != nil {
		return 0, nil, false, fmt.Errorf("vtpm: read in-flight command: %w", err)
	}
	return seq, cmd, true, nil
}

// SetLocality implements Inflight.
func (fi *FileInflight) SetLocality(l uint8) error {
	if _, err := fi.f.WriteAt([]byte{l}, 9); err != nil {
		return fmt.Errorf("vtpm: record locality: %w", err)
	}
	return nil
}

// Locality implements Inflight.
func (fi *FileInflight) Locality() (uint8, error) {
	var b [1]byte
	if _, err := fi.f.ReadAt(b[:], 9); err != nil {
		return 0, fmt.Errorf("vtpm: read recorded locality: %w", err)
	}
	if b[0] > 4 {
		return 0, fmt.Errorf("vtpm: recorded locality %d out of range", b[0])
	}
	return b[0], nil
}
