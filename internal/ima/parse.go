package ima

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Options adjusts parsing for lists other than the default
// binary_runtime_measurements read from its start. The zero value is the
// default.
type Options struct {
	// TemplateHashSize is the size of the template hash column: 0 or 20 for
	// binary_runtime_measurements (SHA-1); the bank's digest size for the
	// per-bank lists of newer kernels (32 for binary_runtime_measurements_sha256).
	TemplateHashSize int
	// MaxTemplateDataLen lowers the template data limit; 0 means
	// MaxTemplateDataLen. It cannot raise it.
	MaxTemplateDataLen int
	// StartOffset is the byte offset of the first byte of the input in the
	// whole list, for a list read from the middle (a resumed read). It only
	// labels offsets in results and errors.
	StartOffset int64
	// StartIndex is the index of the first entry of the input in the whole
	// list; like StartOffset, it only labels results and errors.
	StartIndex int
}

// limits are Options resolved to concrete values.
type limits struct {
	hashSize int
	maxData  int
}

func (o Options) limits() (limits, error) {
	l := limits{hashSize: o.TemplateHashSize, maxData: o.MaxTemplateDataLen}
	if l.hashSize == 0 {
		l.hashSize = SHA1Size
	}
	if l.hashSize < 0 || l.hashSize > MaxTemplateHashSize {
		return limits{}, fmt.Errorf("ima: template hash size %d outside 1..%d: %w", o.TemplateHashSize, MaxTemplateHashSize, ErrInvalid)
	}
	if l.maxData <= 0 || l.maxData > MaxTemplateDataLen {
		l.maxData = MaxTemplateDataLen
	}
	if o.StartOffset < 0 || o.StartIndex < 0 {
		return limits{}, fmt.Errorf("ima: negative start offset %d or index %d: %w", o.StartOffset, o.StartIndex, ErrInvalid)
	}
	return l, nil
}

// ParseList decodes a complete binary measurement list (all of
// binary_runtime_measurements). It returns the entries decoded before the
// first error together with that error, a [*ParseError]; a list that ends
// inside an entry yields an error wrapping ErrTruncated.
func ParseList(b []byte) ([]Entry, error) { return ParseListOptions(b, Options{}) }

// ParseListOptions is [ParseList] with [Options], e.g. for the per-bank lists
// whose template hash column is not SHA-1.
func ParseListOptions(b []byte, o Options) ([]Entry, error) {
	l, err := o.limits()
	if err != nil {
		return nil, err
	}
	var out []Entry
	off := 0
	for off < len(b) {
		e, n, _, err := decodeEntry(b[off:], l, o.StartIndex+len(out), o.StartOffset+int64(off))
		if err != nil {
			return out, err
		}
		out = append(out, e)
		off += n
	}
	return out, nil
}

// ParseEntry decodes the single entry at the start of b and returns it with
// its length in bytes; the bytes after it are ignored. An incomplete entry
// yields an error wrapping ErrTruncated.
func ParseEntry(b []byte) (Entry, int, error) {
	l, _ := Options{}.limits()
	e, n, _, err := decodeEntry(b, l, 0, 0)
	return e, n, err
}

// decodeEntry decodes the entry at the start of b. idx and base label errors.
// On success it returns the entry (holding copies, never aliasing b) and its
// length. When b ends inside the entry it returns a ParseError wrapping
// ErrTruncated and need, the length the entry is known to need so far
// (> len(b)), so a streaming caller knows how much more to read.
func decodeEntry(b []byte, l limits, idx int, base int64) (e Entry, n, need int, err error) {
	fail := func(at int, kind error, format string, args ...any) error {
		return &ParseError{Index: idx, Offset: base, At: base + int64(at), Reason: fmt.Sprintf(format, args...), Err: kind}
	}
	short := func(want int, what string) (Entry, int, int, error) {
		return Entry{}, 0, want, fail(len(b), ErrTruncated, "truncated in %s: have %d of at least %d bytes", what, len(b), want)
	}

	if len(b) < 4 {
		return short(4, "PCR index")
	}
	pcr := binary.LittleEndian.Uint32(b)
	if pcr >= MaxPCR {
		return Entry{}, 0, 0, fail(0, ErrInvalid, "PCR index %d is not below %d", pcr, MaxPCR)
	}
	hashAt := 4
	p := hashAt + l.hashSize
	if len(b) < p+4 {
		return short(p+4, "template hash and name length")
	}
	nameLen := binary.LittleEndian.Uint32(b[p:])
	if nameLen > MaxTemplateNameLen {
		return Entry{}, 0, 0, fail(p, ErrTooLarge, "template name length %d exceeds %d", nameLen, MaxTemplateNameLen)
	}
	if nameLen == 0 {
		return Entry{}, 0, 0, fail(p, ErrInvalid, "empty template name")
	}
	p += 4
	nameAt := p
	p += int(nameLen)
	if len(b) < p {
		return short(p, "template name")
	}
	name := b[nameAt:p]
	for i, c := range name {
		if c <= ' ' || c > '~' {
			return Entry{}, 0, 0, fail(nameAt+i, ErrInvalid, "template name has byte 0x%02x", c)
		}
	}

	var dataAt int
	if string(name) == legacyTemplate {
		// The legacy template has no data length: digest, u32 length, name.
		dataAt = p
		p += legacyDigestSize + 4
		if len(b) < p {
			return short(p, "legacy digest and event name length")
		}
		evLen := binary.LittleEndian.Uint32(b[p-4:])
		if evLen > MaxEventNameLen {
			return Entry{}, 0, 0, fail(p-4, ErrTooLarge, "legacy event name length %d exceeds %d", evLen, MaxEventNameLen)
		}
		p += int(evLen)
		if len(b) < p {
			return short(p, "legacy event name")
		}
	} else {
		if len(b) < p+4 {
			return short(p+4, "template data length")
		}
		dataLen := binary.LittleEndian.Uint32(b[p:])
		if uint64(dataLen) > uint64(l.maxData) {
			return Entry{}, 0, 0, fail(p, ErrTooLarge, "template data length %d exceeds %d", dataLen, l.maxData)
		}
		p += 4
		dataAt = p
		p += int(dataLen)
		if len(b) < p {
			return short(p, "template data")
		}
	}

	// One allocation holds the hash and the data; Fields alias the copy.
	buf := make([]byte, l.hashSize+p-dataAt)
	copy(buf, b[hashAt:hashAt+l.hashSize])
	copy(buf[l.hashSize:], b[dataAt:p])
	e = Entry{
		PCR:          pcr,
		TemplateHash: buf[:l.hashSize:l.hashSize],
		TemplateName: string(name),
		TemplateData: buf[l.hashSize:],
	}
	f, ferr := decodeTemplate(e.TemplateName, e.TemplateData)
	if ferr != nil {
		var fe *fieldError
		at := dataAt
		if errors.As(ferr, &fe) {
			at += fe.off
		}
		return Entry{}, 0, 0, fail(at, ErrInvalid, "template %s: %v", e.TemplateName, ferr)
	}
	e.Fields = f
	return e, p, p, nil
}

// Reader decodes entries one at a time from a stream, such as a
// binary_runtime_measurements file the kernel keeps appending to. It buffers
// its input, so track positions with [Reader.Offset], not the underlying
// file's offset.
//
// Next returns io.EOF when the input ends exactly at an entry boundary and an
// error wrapping ErrTruncated when it ends inside an entry. Neither is final:
// the partial bytes are kept, and a later Next call reads on from the
// underlying reader, so a caller can wait and retry when the list grows.
// Malformed input (ErrInvalid, ErrTooLarge) is final: Next keeps returning
// that error. Other read errors are returned wrapped, and a later Next call
// retries. A Reader is not safe for concurrent use.
type Reader struct {
	r      io.Reader
	l      limits
	buf    []byte // buf[start:end] are bytes read but not yet consumed
	start  int
	end    int
	off    int64 // stream offset of buf[start]
	index  int   // index of the next entry
	err    error // sticky decode error
	readEr error // read error deferred behind data returned with it
}

// NewReader returns a Reader for a binary_runtime_measurements stream read
// from its beginning.
func NewReader(r io.Reader) *Reader {
	rd, _ := NewReaderOptions(r, Options{})
	return rd
}

// NewReaderOptions returns a Reader configured by o: a non-SHA-1 template hash
// column, a lower data limit, or the offset and index of a resumed read. It
// fails only for invalid options.
func NewReaderOptions(r io.Reader, o Options) (*Reader, error) {
	l, err := o.limits()
	if err != nil {
		return nil, err
	}
	return &Reader{r: r, l: l, off: o.StartOffset, index: o.StartIndex}, nil
}

// Offset returns the byte offset just after the last entry Next returned: the
// position to reopen and seek to when resuming the list later.
func (rd *Reader) Offset() int64 { return rd.off }

// Index returns the index of the entry the next call to Next will return
// (the number of entries returned so far, plus Options.StartIndex).
func (rd *Reader) Index() int { return rd.index }

// Buffered returns the number of bytes read from the underlying reader that
// do not yet form a complete entry (a partial entry, after ErrTruncated).
func (rd *Reader) Buffered() int { return rd.end - rd.start }

// Next decodes and returns the next entry; see [Reader] for its errors.
func (rd *Reader) Next() (Entry, error) {
	if rd.err != nil {
		return Entry{}, rd.err
	}
	for {
		e, n, need, err := decodeEntry(rd.buf[rd.start:rd.end], rd.l, rd.index, rd.off)
		if err == nil {
			rd.start += n
			rd.off += int64(n)
			rd.index++
			if rd.start == rd.end {
				rd.start, rd.end = 0, 0
			}
			return e, nil
		}
		if !errors.Is(err, ErrTruncated) {
			rd.err = err
			return Entry{}, err
		}
		rerr := rd.fill(need)
		switch {
		case rerr == nil:
			continue
		case errors.Is(rerr, io.EOF):
			if rd.start == rd.end {
				return Entry{}, io.EOF
			}
			return Entry{}, err
		default:
			return Entry{}, fmt.Errorf("ima: reading entry %d at offset %d: %w", rd.index, rd.off, rerr)
		}
	}
}

// readChunk is the minimum read size, so that small entries do not cost one
// read call each.
const readChunk = 64 << 10

// fill reads at least one more byte into the buffer, making room for an entry
// of need bytes. It returns io.EOF (or another read error) when no byte came.
func (rd *Reader) fill(need int) error {
	if rd.readEr != nil {
		err := rd.readEr
		rd.readEr = nil
		return err
	}
	have := rd.end - rd.start
	want := max(need, have+1, readChunk)
	if len(rd.buf)-rd.start < want {
		if cap(rd.buf) >= want && rd.start > 0 {
			copy(rd.buf, rd.buf[rd.start:rd.end])
		} else {
			nb := make([]byte, max(want, 2*cap(rd.buf)))
			copy(nb, rd.buf[rd.start:rd.end])
			rd.buf = nb
		}
		rd.buf = rd.buf[:cap(rd.buf)]
		rd.start, rd.end = 0, have
	}
	for range 100 {
		n, err := rd.r.Read(rd.buf[rd.end:])
		if n < 0 || n > len(rd.buf)-rd.end {
			return fmt.Errorf("ima: reader returned invalid count %d", n)
		}
		rd.end += n
		if n > 0 {
			if err != nil && !errors.Is(err, io.EOF) {
				rd.readEr = err
			}
			return nil
		}
		if err != nil {
			return err
		}
	}
	return io.ErrNoProgress
}
