// Package wal is an append-only write-ahead log of checksummed, numbered
// frames in rotated segment files. One Append is one write(2) and one
// fdatasync, however many frames it carries, so a caller that groups its
// work pays one sync per group. On Open, a torn tail (damage within the
// last write of the newest segment, what a crash or power loss in the
// middle of an unsynced write leaves; each write's last frame is marked)
// is truncated; a damaged frame followed by a whole later write is not a
// crash artefact but corruption, and Open refuses it with an error naming
// the file and offset. Segments are deleted by Release once
// their frames are applied elsewhere.
//
// Segments are preallocated: each is created zero-filled to its full
// size, so that an Append overwrites blocks the file already has and its
// fdatasync flushes data only, with no size change or block allocation
// for the file system to journal first (a quarter off each group's
// fdatasync on ext4 here; docs/performance.md, vTPM mode). The next
// segment is zero-filled in the background while the current one fills,
// and rotation renames it into place. A segment's zero tail is where its
// frames end.
package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Frame layout: u32 payload length (its top bit set on the last frame of
// an Append), u32 CRC-32C of (length, seq, payload), u64 sequence number,
// payload. Sequence numbers are consecutive across segments, starting at 1.
const (
	headerSize = 16
	// MaxPayload bounds one frame's payload: a length above it is damage,
	// not a frame.
	MaxPayload = 64 << 20
	// segMagic starts every segment file.
	segMagic = "tpmmux-wal-v1\n\x00\x00"
	// DefaultSegmentSize is the size past which Append starts a new
	// segment.
	DefaultSegmentSize = 4 << 20
	segSuffix          = ".wal"
	// nextName is the segment being zero-filled for the next rotation;
	// it holds no frame (Open deletes a leftover one).
	nextName = "next-segment.tmp"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrCorrupt reports a damaged frame that is not a torn tail.
var ErrCorrupt = errors.New("write-ahead log corrupt")

// errShort is Decode's answer for bytes that end inside a frame.
var errShort = errors.New("frame cut short")

// groupEnd is the length field's flag of the last frame of an Append.
const groupEnd = 1 << 31

// Frame is one decoded frame.
type Frame struct {
	Seq     uint64
	Payload []byte
	// Last says the frame ended its Append: only the frames of the last
	// Append, unsynced at a crash, may be damaged by it.
	Last bool
}

// Encode appends the frame (seq, payload), the last of its Append, to b.
func Encode(b []byte, seq uint64, payload []byte) []byte {
	return encode(b, seq, payload, true)
}

func encode(b []byte, seq uint64, payload []byte, last bool) []byte {
	var h [headerSize]byte
	n := uint32(len(payload))
	if last {
		n |= groupEnd
	}
	binary.LittleEndian.PutUint32(h[0:], n)
	binary.LittleEndian.PutUint64(h[8:], seq)
	binary.LittleEndian.PutUint32(h[4:], checksum(h[:], payload))
	b = append(b, h[:]...)
	return append(b, payload...)
}

func checksum(h []byte, payload []byte) uint32 {
	c := crc32.Update(0, castagnoli, h[0:4])
	c = crc32.Update(c, castagnoli, h[8:16])
	return crc32.Update(c, castagnoli, payload)
}

// Decode decodes the frame at the start of b and returns it and its size
// in bytes. The payload aliases b. Bytes that end inside the frame give an
// error wrapping io.ErrUnexpectedEOF's meaning (errShort); any other
// mismatch gives ErrCorrupt.
func Decode(b []byte) (Frame, int, error) {
	if len(b) < headerSize {
		return Frame{}, 0, errShort
	}
	n := binary.LittleEndian.Uint32(b[0:])
	last := n&groupEnd != 0
	n &^= groupEnd
	if n > MaxPayload {
		return Frame{}, 0, fmt.Errorf("%w: frame length %d exceeds %d", ErrCorrupt, n, MaxPayload)
	}
	if len(b)-headerSize < int(n) {
		return Frame{}, 0, errShort
	}
	payload := b[headerSize : headerSize+int(n)]
	if checksum(b[:headerSize], payload) != binary.LittleEndian.Uint32(b[4:]) {
		return Frame{}, 0, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return Frame{Seq: binary.LittleEndian.Uint64(b[8:]), Payload: payload, Last: last}, headerSize + int(n), nil
}

// Options tune a Log; the zero value is the safe default.
type Options struct {
	// SegmentSize is the size past which a new segment starts; default
	// DefaultSegmentSize.
	SegmentSize int64
	// NoSync skips fdatasync: only tests and benchmarks that measure the
	// rest of the pipeline set it.
	NoSync bool
	// NoPreallocate makes segments grow with their writes instead of
	// being created zero-filled (NoSync implies it: without fdatasyncs
	// there is nothing to gain).
	NoPreallocate bool
	// BeforeWrite, if set, is called with each group's bytes and the
	// offset they go to before they are written; a crash test kills the
	// process in it (after writing a part itself, to leave a torn tail).
	BeforeWrite func(f *os.File, off int64, b []byte)
}

func (o Options) preallocate() bool { return !o.NoPreallocate && !o.NoSync }

// Log is an open write-ahead log. Append and Release must not be called
// concurrently with each other (one writer).
type Log struct {
	dir  string
	opts Options
	segs []segment // oldest first; the last is open for appending
	f    *os.File  // the last segment
	size int64     // where its frames end: the next write's offset
	next uint64    // the next frame's sequence number
	buf  []byte
	// broken is set when a failed append could not be undone: the file's
	// end is unknown, so nothing more is appended until a reopen.
	broken error
	// frames read by Open, in order; dropped after Frames is called.
	frames []Frame
	// end is where the frames of the segment readSegment read last end.
	end int64
	// prep is the background zero-fill of the next segment (nil: none
	// under way); stopPrep asks it to give up (Close).
	prep     chan error
	stopPrep atomic.Bool
}

type segment struct {
	first uint64 // sequence number of its first frame (its name)
	path  string
}

func segName(first uint64) string { return fmt.Sprintf("%016x%s", first, segSuffix) }

// Open opens (creating if needed, mode 0700) the log in dir, checks every
// frame and truncates a torn tail. Frames returns what it read.
func Open(dir string, opts Options) (*Log, error) {
	if opts.SegmentSize <= 0 {
		opts.SegmentSize = DefaultSegmentSize
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open write-ahead log %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open write-ahead log %s: %w", dir, err)
	}
	l := &Log{dir: dir, opts: opts, next: 1}
	for _, e := range ents {
		name := e.Name()
		if name == nextName {
			// A zero-fill under way at a crash: never part of the log.
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				return nil, fmt.Errorf("open write-ahead log %s: %w", dir, err)
			}
			continue
		}
		if !strings.HasSuffix(name, segSuffix) {
			continue
		}
		first, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 16, 64)
		if err != nil || segName(first) != name {
			return nil, fmt.Errorf("open write-ahead log %s: unexpected file %s (move it out of the directory)", dir, name)
		}
		l.segs = append(l.segs, segment{first: first, path: filepath.Join(dir, name)})
	}
	slices.SortFunc(l.segs, func(a, b segment) int { return cmpU64(a.first, b.first) })
	for i, s := range l.segs {
		last := i == len(l.segs)-1
		if i == 0 {
			l.next = s.first
		}
		if s.first != l.next {
			return nil, fmt.Errorf("%w: %s starts at frame %d but the segment before it ends at frame %d", ErrCorrupt, s.path, s.first, l.next-1)
		}
		if err := l.readSegment(s, last); err != nil {
			return nil, err
		}
	}
	if len(l.segs) == 0 {
		if l.opts.preallocate() {
			// The first segment: zero-filled now, before any write.
			l.startPrep()
		}
		if err := l.newSegment(true); err != nil {
			l.Close()
			return nil, err
		}
		return l, nil
	}
	s := l.segs[len(l.segs)-1]
	f, err := os.OpenFile(s.path, os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open write-ahead log segment %s: %w", s.path, err)
	}
	l.f, l.size = f, l.end
	return l, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// readSegment reads segment s's frames into l.frames. In the newest
// segment (last) a bad frame with no valid frame after it is a torn tail:
// the file is truncated before it.
func (l *Log) readSegment(s segment, last bool) error {
	b, err := os.ReadFile(s.path)
	if err != nil {
		return fmt.Errorf("read write-ahead log segment %s: %w", s.path, err)
	}
	if len(b) < len(segMagic) || string(b[:len(segMagic)]) != segMagic {
		if last && len(b) < len(segMagic) && strings.HasPrefix(segMagic, string(b)) {
			// Created, header not yet complete: a crash at rotation.
			l.end = int64(len(segMagic))
			return l.truncate(s.path, 0, true)
		}
		if last && len(b) >= len(segMagic) && strings.HasPrefix(segMagic, strings.TrimRight(string(b[:len(segMagic)]), "\x00")) && allZero(b[len(segMagic):]) {
			// A zero-filled segment renamed into place, its header not
			// yet complete: a crash at rotation.
			l.end = int64(len(segMagic))
			return l.rewriteHeader(s.path)
		}
		return fmt.Errorf("%w: %s offset 0: not a tpmmux write-ahead log segment", ErrCorrupt, s.path)
	}
	off := len(segMagic)
	defer func() { l.end = int64(off) }()
	for off < len(b) {
		if allZero(b[off:]) {
			// The zero-filled rest of a preallocated segment.
			return nil
		}
		fr, n, err := Decode(b[off:])
		if err == nil && fr.Seq != l.next {
			err = fmt.Errorf("%w: frame %d where frame %d belongs", ErrCorrupt, fr.Seq, l.next)
		}
		if err != nil {
			if !last {
				return fmt.Errorf("%s offset %d: %w (the segment is not the newest, so this is not a torn write: restore the state directory from a backup or move the segment aside, losing what it holds)", s.path, off, errors.Join(ErrCorrupt, err))
			}
			if at, ok := l.laterAppend(b, off+1); ok {
				return fmt.Errorf("%s offset %d: %w: a whole later write follows at offset %d, so this is damage, not a torn write (restore the state directory from a backup)", s.path, off, errors.Join(ErrCorrupt, err), at)
			}
			// A torn last write: a crash, or a power loss that kept some
			// of its pages and not others. None of it was acknowledged.
			return l.truncate(s.path, int64(off), false)
		}
		l.frames = append(l.frames, Frame{Seq: fr.Seq, Payload: slices.Clone(fr.Payload)})
		l.next++
		off += n
	}
	return nil
}

// laterAppend reports whether, after a bad frame, b holds the frames of a
// later Append than the one the bad frame may belong to: then the bad
// frame is not in the last, unsynced write, and is damage. The frames of
// the last write that follow a bad one (a power loss can keep its later
// pages and lose an earlier one) are at most one Append: a run of valid
// frames to the end of b in which only the final one ends an Append.
func (l *Log) laterAppend(b []byte, from int) (int, bool) {
	at := -1
	for p := from; p+headerSize <= len(b); p++ {
		if b[p] == 0 {
			// A frame's header is never all zeros: skip to where one
			// could start before the next non-zero byte (a zero-filled
			// segment's rest is megabytes of zeros).
			q := p
			for q < len(b) && b[q] == 0 {
				q++
			}
			if q == len(b) {
				break
			}
			p = max(p, q-headerSize+1)
		}
		if fr, _, err := Decode(b[p:]); err == nil && fr.Seq >= l.next {
			at = p
			break
		}
	}
	if at < 0 {
		return 0, false
	}
	for p := at; p < len(b) && !allZero(b[p:]); {
		fr, n, err := Decode(b[p:])
		if err != nil {
			return at, true // damaged again: not one torn write
		}
		p += n
		if fr.Last && p < len(b) && !allZero(b[p:]) {
			return at, true
		}
	}
	return 0, false
}

// allZero reports whether b holds only zero bytes.
func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// rewriteHeader writes the segment header of a zero-filled segment whose
// header a crash cut short, keeping its zero-filled size.
func (l *Log) rewriteHeader(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("rewrite header of %s: %w", path, err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(segMagic), 0); err != nil {
		return fmt.Errorf("rewrite header of %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("rewrite header of %s: %w", path, err)
	}
	return nil
}

func (l *Log) truncate(path string, size int64, header bool) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("truncate torn tail of %s: %w", path, err)
	}
	defer f.Close()
	if header {
		if err := f.Truncate(0); err != nil {
			return fmt.Errorf("truncate torn tail of %s: %w", path, err)
		}
		if _, err := f.WriteAt([]byte(segMagic), 0); err != nil {
			return fmt.Errorf("rewrite header of %s: %w", path, err)
		}
	} else if err := f.Truncate(size); err != nil {
		return fmt.Errorf("truncate torn tail of %s at offset %d: %w", path, size, err)
	}
	if !header && l.opts.preallocate() && size < l.opts.SegmentSize {
		// Zero-filled again, so that the segment's later writes still
		// overwrite allocated blocks (the cut tail was torn, not
		// acknowledged; zeros are its end on the next Open). A failure
		// leaves it cut: slower to append to, not wrong.
		zeros := make([]byte, min(l.opts.SegmentSize-size, zeroChunk))
		for off := size; off < l.opts.SegmentSize; off += int64(len(zeros)) {
			if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), l.opts.SegmentSize-off)], off); err != nil {
				if terr := f.Truncate(size); terr != nil {
					return fmt.Errorf("truncate torn tail of %s at offset %d: %w", path, size, terr)
				}
				break
			}
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("truncate torn tail of %s: %w", path, err)
	}
	return nil
}

// Frames returns the frames Open read, oldest first, once; the log keeps
// no copy afterwards.
func (l *Log) Frames() []Frame {
	fr := l.frames
	l.frames = nil
	return fr
}

// Next returns the sequence number the next appended frame gets.
func (l *Log) Next() uint64 { return l.next }

// newSegment starts a segment whose first frame is l.next and makes it
// durable (header and directory entry) before any frame goes into it. It
// takes the zero-filled next segment if that is ready (wait: wait for
// it), else creates one that grows with its writes. (Append starts
// zero-filling the one after once this one is half full.)
func (l *Log) newSegment(wait bool) error {
	s := segment{first: l.next, path: filepath.Join(l.dir, segName(l.next))}
	var f *os.File
	if l.prep != nil {
		var err error
		ready := wait
		if !wait {
			select {
			case err = <-l.prep:
				ready = true
			default:
			}
		} else {
			err = <-l.prep
		}
		if ready {
			l.prep = nil
			// A failed zero-fill or rename costs speed, not data: the
			// segment is then created unfilled and grows with its writes.
			if err == nil {
				f, _ = l.takePrepared(s.path)
			}
		}
	}
	if f == nil {
		var err error
		f, err = os.OpenFile(s.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fmt.Errorf("create write-ahead log segment: %w", err)
		}
	}
	if _, err := f.WriteAt([]byte(segMagic), 0); err != nil {
		f.Close()
		os.Remove(s.path)
		return fmt.Errorf("write header of %s: %w", s.path, err)
	}
	if !l.opts.NoSync {
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			f.Close()
			return fmt.Errorf("sync %s: %w", s.path, err)
		}
		if err := syncDir(l.dir); err != nil {
			f.Close()
			return err
		}
	}
	if l.f != nil {
		l.f.Close()
	}
	l.f, l.size = f, int64(len(segMagic))
	l.segs = append(l.segs, s)
	return nil
}

// prepAt is how full the current segment is when the next one starts
// being zero-filled: late enough that a log that has just started (or
// rotated) does not write megabytes of zeros while its first groups want
// the disk, early enough that the zeros are ready before rotation.
const prepAt = 2 // of 4: half full

// zeroChunk is how much of a segment is zero-filled and synced at a
// time, and zeroPause the pause after each chunk.
const (
	zeroChunk = 256 << 10
	zeroPause = time.Millisecond
)

// startPrep starts zero-filling the next segment in the background.
func (l *Log) startPrep() {
	done := make(chan error, 1)
	l.prep = done
	path := filepath.Join(l.dir, nextName)
	size := l.opts.SegmentSize
	pause := zeroPause
	if len(l.segs) == 0 {
		pause = 0 // the first segment: Open waits for it
	}
	go func() { done <- zeroFill(path, size, pause, &l.stopPrep) }()
}

// zeroFill creates path zero-filled to size bytes and syncs it (its
// directory entry is made durable when it is renamed into place). On
// failure (a full disk) it deletes the file again: it must not take the
// space the log's writes need.
func zeroFill(path string, size int64, pause time.Duration, stop *atomic.Bool) (err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("zero-fill %s: %w", path, err)
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(path)
		}
	}()
	// In chunks, each synced, with a pause between: one flush of
	// megabytes would hold the log's own fdatasyncs up behind it.
	zeros := make([]byte, min(size, zeroChunk))
	for off := int64(0); off < size; off += int64(len(zeros)) {
		if stop.Load() {
			return fmt.Errorf("zero-fill %s: stopped", path)
		}
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), size-off)], off); err != nil {
			return fmt.Errorf("zero-fill %s: %w", path, err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			return fmt.Errorf("zero-fill %s: %w", path, err)
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
	return nil
}

// takePrepared renames the zero-filled next segment to path and opens it.
func (l *Log) takePrepared(path string) (*os.File, error) {
	if err := os.Rename(filepath.Join(l.dir, nextName), path); err != nil {
		return nil, fmt.Errorf("rename zero-filled segment to %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0o600)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("open zero-filled segment %s: %w", path, err)
	}
	return f, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

// Append writes the payloads as consecutive frames with one write and one
// fdatasync, and returns the first one's sequence number. When it returns
// nil, every frame is durable. On an error none may be relied on: a failed
// write (a full disk) is cut off the file again, so a later Append may
// succeed; after a failed fdatasync, whose data may or may not be on disk,
// every later Append fails until the log is reopened (Open recovers).
func (l *Log) Append(payloads ...[]byte) (uint64, error) {
	if l.broken != nil {
		return 0, l.broken
	}
	if len(payloads) == 0 {
		return l.next, nil
	}
	if l.size >= l.opts.SegmentSize {
		if err := l.newSegment(false); err != nil {
			return 0, err
		}
	}
	first := l.next
	b := l.buf[:0]
	for i, p := range payloads {
		if len(p) > MaxPayload {
			return 0, fmt.Errorf("write-ahead log frame of %d bytes exceeds %d", len(p), MaxPayload)
		}
		b = encode(b, first+uint64(i), p, i == len(payloads)-1)
	}
	l.buf = b
	if l.opts.BeforeWrite != nil {
		l.opts.BeforeWrite(l.f, l.size, b)
	}
	if _, err := l.f.WriteAt(b, l.size); err != nil {
		err = fmt.Errorf("append to write-ahead log %s: %w", l.f.Name(), err)
		if terr := l.f.Truncate(l.size); terr != nil {
			l.broken = fmt.Errorf("%w; cutting the partial write off failed (%v): reopen the log", err, terr)
		}
		return 0, err
	}
	if !l.opts.NoSync {
		if err := unix.Fdatasync(int(l.f.Fd())); err != nil {
			l.broken = fmt.Errorf("sync write-ahead log %s: %w (whether the data is on disk is unknown: reopen the log)", l.f.Name(), err)
			return 0, l.broken
		}
	}
	l.size += int64(len(b))
	l.next += uint64(len(payloads))
	if l.prep == nil && l.opts.preallocate() && l.size >= l.opts.SegmentSize*prepAt/4 {
		l.startPrep()
	}
	if cap(l.buf) > 1<<20 {
		l.buf = nil
	}
	return first, nil
}

// Release says frames before seq are applied and no longer needed: every
// segment all of whose frames are before seq is deleted (never the one
// being appended to). It returns how many were deleted.
func (l *Log) Release(seq uint64) (int, error) {
	n := 0
	for len(l.segs) > 1 && l.segs[1].first <= seq {
		if err := os.Remove(l.segs[0].path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return n, fmt.Errorf("delete applied write-ahead log segment: %w", err)
		}
		l.segs = l.segs[1:]
		n++
	}
	if n > 0 && !l.opts.NoSync {
		if err := syncDir(l.dir); err != nil {
			return n, err
		}
	}
	return n, nil
}

// Rotate starts a new segment if the current one holds any frame, so that
// a Release can delete every frame written so far once it is applied (a
// store that forgets data calls it: no segment keeps the data longer).
func (l *Log) Rotate() error {
	if l.broken != nil {
		return l.broken
	}
	if l.size <= int64(len(segMagic)) {
		return nil
	}
	return l.newSegment(false)
}

// Segments returns how many segment files the log has.
func (l *Log) Segments() int { return len(l.segs) }

// Close closes the segment being appended to, after stopping a
// zero-fill under way.
func (l *Log) Close() error {
	if l.prep != nil {
		l.stopPrep.Store(true)
		<-l.prep
		l.prep = nil
	}
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
