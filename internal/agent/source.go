package agent

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// checkpointEvery is the spacing, in entries, of the byte offsets the
// source remembers, so that going back to an entry (a resume point behind
// what was read) re-parses at most this many entries.
const checkpointEvery = 256

// errListBroken wraps a malformed measurement list: retrying cannot help.
var errListBroken = errors.New("measurement list is malformed")

// source reads a guest's IMA measurement list incrementally. The kernel
// only ever appends to the list within a boot, so an entry index names the
// same entry for as long as the agent runs; the source keeps the file open
// and reads on from where it stopped (securityfs has no inotify: the
// caller polls), remembering the byte offset of every checkpointEvery-th
// entry so that it can go back to any index without re-parsing the list
// from the start.
type source struct {
	path string
	alg  string
	opts ima.Options

	f  *os.File
	rd *ima.Reader
	// peek is the entry at index want, read but not yet taken.
	peek *ima.Entry
	// want is the index of the next entry to hand out.
	want uint64
	// checkpoints[k] is the byte offset of entry k*checkpointEvery.
	checkpoints []int64
	// known is how many entries the source has seen so far.
	known uint64
}

// openSource opens the list at path; alg is the template hash algorithm of
// its template-hash column ("sha1" for binary_runtime_measurements,
// "sha256" for binary_runtime_measurements_sha256).
func openSource(path, alg string) (*source, error) {
	size := 0
	switch alg {
	case "sha1":
		size = 20
	case "sha256":
		size = 32
	default:
		return nil, fmt.Errorf("template hash algorithm %q: want sha1 or sha256", alg)
	}
	s := &source{path: path, alg: alg, opts: ima.Options{TemplateHashSize: size}, checkpoints: []int64{0}}
	if err := s.reopen(0); err != nil {
		return nil, err
	}
	return s, nil
}

// reopen opens the list again at checkpoint k.
func (s *source) reopen(k int) error {
	if s.f != nil {
		s.f.Close()
		s.f, s.rd = nil, nil
	}
	f, err := os.Open(s.path)
	if err != nil {
		return fmt.Errorf("open measurement list: %w", err)
	}
	off := s.checkpoints[k]
	if off > 0 {
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			f.Close()
			return fmt.Errorf("seek measurement list %s to %d: %w", s.path, off, err)
		}
	}
	o := s.opts
	o.StartOffset, o.StartIndex = off, k*checkpointEvery
	rd, err := ima.NewReaderOptions(f, o)
	if err != nil {
		f.Close()
		return fmt.Errorf("measurement list %s: %w", s.path, err)
	}
	s.f, s.rd, s.peek = f, rd, nil
	return nil
}

// close releases the file.
func (s *source) close() {
	if s.f != nil {
		s.f.Close()
		s.f, s.rd = nil, nil
	}
}

// seek makes idx the next entry handed out. Going forward skips entries as
// they are read (the list may not have them yet); going back reopens the
// file at the nearest checkpoint.
func (s *source) seek(idx uint64) error {
	if s.peek != nil && idx == s.want {
		return nil
	}
	pos := uint64(s.rd.Index()) // the index the reader returns next
	if s.peek != nil {
		pos--
	}
	s.want = idx
	if idx >= pos {
		if s.peek != nil && idx > pos {
			s.peek = nil
		}
		return nil
	}
	k := min(int(idx/checkpointEvery), len(s.checkpoints)-1)
	return s.reopen(k)
}

// scan reads to the current end of the list, recording checkpoints, and
// returns how many entries it holds. It leaves want where it was (a later
// take reopens at a checkpoint if the scan went past it).
func (s *source) scan() (uint64, error) {
	want := s.want
	for {
		_, ok, err := s.read()
		if err != nil {
			return 0, err
		}
		if !ok {
			break
		}
	}
	if err := s.seek(want); err != nil {
		return 0, err
	}
	return s.known, nil
}

// read decodes the next entry from the file, whatever its index, and
// records its checkpoint. ok is false when the list has no more complete
// entries for now.
func (s *source) read() (ima.Entry, bool, error) {
	idx, off := uint64(s.rd.Index()), s.rd.Offset()
	e, err := s.rd.Next()
	switch {
	case err == nil:
	case errors.Is(err, io.EOF), errors.Is(err, ima.ErrTruncated):
		return ima.Entry{}, false, nil
	case errors.Is(err, ima.ErrInvalid), errors.Is(err, ima.ErrTooLarge):
		return ima.Entry{}, false, fmt.Errorf("%s: %w: %w", s.path, errListBroken, err)
	default:
		return ima.Entry{}, false, fmt.Errorf("read measurement list: %w", err)
	}
	if idx%checkpointEvery == 0 && int(idx/checkpointEvery) == len(s.checkpoints) {
		s.checkpoints = append(s.checkpoints, off)
	}
	s.known = max(s.known, idx+1)
	return e, true, nil
}

// next returns the entry at index want without taking it; ok is false if
// the list does not have it yet.
func (s *source) next() (ima.Entry, bool, error) {
	if s.peek != nil {
		return *s.peek, true, nil
	}
	for {
		idx := uint64(s.rd.Index())
		if idx > s.want {
			// The reader is past want (a scan ran ahead): go back.
			if err := s.seek(s.want); err != nil {
				return ima.Entry{}, false, err
			}
			continue
		}
		e, ok, err := s.read()
		if err != nil || !ok {
			return ima.Entry{}, false, err
		}
		if idx < s.want {
			continue
		}
		s.peek = &e
		return e, true, nil
	}
}

// take consumes the entry next returned.
func (s *source) take() {
	s.peek = nil
	s.want++
}

// wireEntry is e as the agent sends it.
func (s *source) wireEntry(e ima.Entry) wire.Entry {
	return wire.Entry{PCR: e.PCR, HashAlg: s.alg, TemplateHash: e.TemplateHash, Template: e.TemplateName, Data: e.TemplateData}
}

// entryOverhead bounds the CBOR bytes of one wire.Entry beyond its byte
// strings (map header, keys, lengths, the hash algorithm name).
const entryOverhead = 40

// frame collects the entries from want on into one Measurements frame of
// at most maxEntries entries and about maxPayload bytes (one larger entry
// goes alone). ok is false when no entry is ready.
func (s *source) frame(maxEntries, maxPayload int) (*wire.Measurements, bool, error) {
	m := &wire.Measurements{First: s.want}
	size := 32
	for len(m.Entries) < maxEntries {
		e, ok, err := s.next()
		if err != nil {
			return nil, false, err
		}
		if !ok {
			break
		}
		n := len(e.TemplateData) + len(e.TemplateHash) + len(e.TemplateName) + entryOverhead
		if len(m.Entries) > 0 && size+n > maxPayload {
			break
		}
		m.Entries = append(m.Entries, s.wireEntry(e))
		size += n
		s.take()
	}
	return m, len(m.Entries) > 0, nil
}
