package ima

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"
)

// chunkReader returns the data in chunks of random sizes between 1 and max.
type chunkReader struct {
	data []byte
	rng  *rand.Rand
	max  int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(1+c.rng.IntN(c.max), len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

// growingReader is a file the kernel appends to: Read returns io.EOF at the
// current end, and more data can be appended later.
type growingReader struct {
	data []byte
	pos  int
}

func (g *growingReader) Read(p []byte) (int, error) {
	if g.pos == len(g.data) {
		return 0, io.EOF
	}
	n := copy(p, g.data[g.pos:])
	g.pos += n
	return n, nil
}

// readAll drains a Reader and returns the entries and the final error.
func readAll(rd *Reader) ([]Entry, error) {
	var es []Entry
	for {
		e, err := rd.Next()
		if err != nil {
			return es, err
		}
		es = append(es, e)
	}
}

func equalEntries(t *testing.T, got, want []Entry) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	for i := range got {
		if !got[i].Equal(want[i]) {
			t.Fatalf("entry %d differs", i)
		}
	}
}

func TestReaderChunked(t *testing.T) {
	bin := readTestdata(t, testBin)
	want := mustParse(t, bin)
	readers := map[string]func() io.Reader{
		"whole":      func() io.Reader { return bytes.NewReader(bin) },
		"one-byte":   func() io.Reader { return iotest.OneByteReader(bytes.NewReader(bin)) },
		"half":       func() io.Reader { return iotest.HalfReader(bytes.NewReader(bin)) },
		"data-err":   func() io.Reader { return iotest.DataErrReader(bytes.NewReader(bin)) },
		"random-7":   func() io.Reader { return &chunkReader{bin, rand.New(rand.NewPCG(1, 2)), 7} },
		"random-300": func() io.Reader { return &chunkReader{bin, rand.New(rand.NewPCG(3, 4)), 300} },
		"random-5k":  func() io.Reader { return &chunkReader{bin, rand.New(rand.NewPCG(5, 6)), 5000} },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			rd := NewReader(mk())
			got, err := readAll(rd)
			if err != io.EOF {
				t.Fatalf("final error %v, want io.EOF", err)
			}
			equalEntries(t, got, want)
			if rd.Offset() != int64(len(bin)) || rd.Index() != testEntries || rd.Buffered() != 0 {
				t.Errorf("offset %d index %d buffered %d", rd.Offset(), rd.Index(), rd.Buffered())
			}
			if _, err := rd.Next(); err != io.EOF {
				t.Errorf("Next after EOF: %v, want io.EOF", err)
			}
		})
	}
}

// checkPrefix checks ParseList and Reader on a prefix of a list whose entry
// boundaries are bounds.
func checkPrefix(t *testing.T, bin []byte, bounds []int, k int) {
	t.Helper()
	complete := 0 // entries wholly inside bin[:k]
	for complete+1 < len(bounds) && bounds[complete+1] <= k {
		complete++
	}
	atBoundary := bounds[complete] == k

	es, lerr := ParseList(bin[:k])
	rd := NewReader(bytes.NewReader(bin[:k]))
	res, rerr := readAll(rd)
	if len(es) != complete || len(res) != complete {
		t.Fatalf("prefix %d: ParseList %d entries, Reader %d, want %d", k, len(es), len(res), complete)
	}
	if atBoundary {
		if lerr != nil || rerr != io.EOF {
			t.Fatalf("prefix %d at a boundary: ParseList %v, Reader %v", k, lerr, rerr)
		}
		return
	}
	for _, err := range []error{lerr, rerr} {
		var pe *ParseError
		if !errors.Is(err, ErrTruncated) || !errors.As(err, &pe) {
			t.Fatalf("prefix %d: error %v, want a ParseError wrapping ErrTruncated", k, err)
		}
		if pe.Index != complete || pe.Offset != int64(bounds[complete]) || pe.At != int64(k) {
			t.Fatalf("prefix %d: error index %d offset %d at %d, want %d %d %d", k, pe.Index, pe.Offset, pe.At, complete, bounds[complete], k)
		}
	}
	if rd.Offset() != int64(bounds[complete]) || rd.Buffered() != k-bounds[complete] {
		t.Fatalf("prefix %d: reader offset %d buffered %d", k, rd.Offset(), rd.Buffered())
	}
	// The truncation is not final: the same error again, no progress.
	if _, err := rd.Next(); !errors.Is(err, ErrTruncated) {
		t.Fatalf("prefix %d: second Next %v", k, err)
	}
}

func TestTruncatedEveryOffset(t *testing.T) {
	bin := readTestdata(t, testBin)
	bounds := entryBounds(t, bin)
	// Every offset of the first six entries (unsigned and signed ones)...
	for k := 0; k <= bounds[6]; k++ {
		checkPrefix(t, bin, bounds, k)
	}
	// ...and around every boundary and at a stride through the whole list.
	for _, b := range bounds[6:] {
		for _, k := range []int{b - 1, b, b + 1} {
			if k >= 0 && k <= len(bin) {
				checkPrefix(t, bin, bounds, k)
			}
		}
	}
	for k := bounds[6]; k < len(bin); k += 997 {
		checkPrefix(t, bin, bounds, k)
	}
}

func TestParseEntry(t *testing.T) {
	bin := readTestdata(t, testBin)
	bounds := entryBounds(t, bin)
	e, n, err := ParseEntry(bin)
	if err != nil || n != bounds[1] || e.Fields.Path != "boot_aggregate" {
		t.Fatalf("ParseEntry: %v, n %d, path %q", err, n, e.Fields.Path)
	}
	for k := range bounds[1] {
		if _, _, err := ParseEntry(bin[:k]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("ParseEntry of %d bytes: %v", k, err)
		}
	}
	// Entries never alias the input.
	cp := append([]byte(nil), bin[:bounds[1]]...)
	e, _, _ = ParseEntry(cp)
	for i := range cp {
		cp[i] = 0xAA
	}
	if e.Fields.Path != "boot_aggregate" || e.TemplateHash[0] != 0x5e || e.Fields.Digest[0] != 0x01 {
		t.Fatal("parsed entry changed when its input was overwritten")
	}
}

// A guest agent tails a growing list: it gets io.EOF or ErrTruncated, waits,
// and calls Next again on the same Reader.
func TestReaderResumesGrowingList(t *testing.T) {
	bin := readTestdata(t, testBin)
	want := mustParse(t, bin)
	rng := rand.New(rand.NewPCG(7, 8))
	g := &growingReader{}
	rd := NewReader(g)
	var got []Entry
	for len(g.data) < len(bin) {
		n := min(len(bin)-len(g.data), 1+rng.IntN(2000))
		g.data = append(g.data, bin[len(g.data):len(g.data)+n]...)
		for {
			e, err := rd.Next()
			if err == nil {
				got = append(got, e)
				continue
			}
			if err != io.EOF && !errors.Is(err, ErrTruncated) {
				t.Fatalf("after %d bytes: %v", len(g.data), err)
			}
			if (err == io.EOF) != (rd.Buffered() == 0) {
				t.Fatalf("after %d bytes: %v with %d bytes buffered", len(g.data), err, rd.Buffered())
			}
			if rd.Offset()+int64(rd.Buffered()) != int64(len(g.data)) {
				t.Fatalf("offset %d + buffered %d != %d bytes available", rd.Offset(), rd.Buffered(), len(g.data))
			}
			break
		}
	}
	equalEntries(t, got, want)
}

// A resumed read (reopen, seek to Offset, new Reader) labels entries and
// errors with absolute positions.
func TestReaderStartOptions(t *testing.T) {
	bin := readTestdata(t, testBin)
	bounds := entryBounds(t, bin)
	start := bounds[100]
	rd, err := NewReaderOptions(bytes.NewReader(bin[start:]), Options{StartOffset: int64(start), StartIndex: 100})
	if err != nil {
		t.Fatal(err)
	}
	es, err := readAll(rd)
	if err != io.EOF || len(es) != testEntries-100 || rd.Index() != testEntries || rd.Offset() != int64(len(bin)) {
		t.Fatalf("resumed read: %d entries, %v, index %d offset %d", len(es), err, rd.Index(), rd.Offset())
	}

	bad := append([]byte(nil), bin...)
	bad[bounds[150]+27] = 0x01 // name length of entry 150 becomes 0x01000007
	rd, _ = NewReaderOptions(bytes.NewReader(bad[start:]), Options{StartOffset: int64(start), StartIndex: 100})
	_, err = readAll(rd)
	var pe *ParseError
	if !errors.As(err, &pe) || !errors.Is(err, ErrTooLarge) || pe.Index != 150 || pe.Offset != int64(bounds[150]) || pe.At != int64(bounds[150]+24) {
		t.Fatalf("error %v (%+v), want entry 150 at %d", err, pe, bounds[150])
	}
	if _, err := NewReaderOptions(bytes.NewReader(nil), Options{TemplateHashSize: 65}); !errors.Is(err, ErrInvalid) {
		t.Errorf("hash size 65: %v", err)
	}
	if _, err := NewReaderOptions(bytes.NewReader(nil), Options{StartOffset: -1}); !errors.Is(err, ErrInvalid) {
		t.Errorf("negative offset: %v", err)
	}
}

// Malformed input is final; the reader does not skip or resynchronize.
func TestReaderStickyError(t *testing.T) {
	bin := readTestdata(t, testBin)
	bounds := entryBounds(t, bin)
	bad := append([]byte(nil), bin...)
	copy(bad[bounds[3]+28:], "IMA-SIG") // template name with uppercase is fine...
	bad[bounds[3]+28+3] = ' '           // ...but a space is not
	rd := NewReader(bytes.NewReader(bad))
	es, err := readAll(rd)
	if len(es) != 3 || !errors.Is(err, ErrInvalid) {
		t.Fatalf("%d entries, %v", len(es), err)
	}
	if _, err2 := rd.Next(); err2 != err {
		t.Fatalf("second Next: %v, want the same error", err2)
	}
}

// Transient read errors are returned wrapped and do not lose data.
func TestReaderTransientReadError(t *testing.T) {
	bin := readTestdata(t, testBin)
	want := mustParse(t, bin)
	rd := NewReader(iotest.TimeoutReader(iotest.HalfReader(bytes.NewReader(bin))))
	var got []Entry
	timeouts := 0
	for {
		e, err := rd.Next()
		if err == io.EOF {
			break
		}
		if errors.Is(err, iotest.ErrTimeout) {
			timeouts++
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, e)
	}
	if timeouts != 1 {
		t.Errorf("%d timeouts, want 1", timeouts)
	}
	equalEntries(t, got, want)

	// An error delivered with data is reported after the data is used.
	boom := errors.New("boom")
	rd = NewReader(iotest.ErrReader(boom))
	if _, err := rd.Next(); !errors.Is(err, boom) {
		t.Errorf("ErrReader: %v", err)
	}
	bounds := entryBounds(t, bin)
	rd = NewReader(io.MultiReader(bytes.NewReader(bin[:bounds[2]]), iotest.ErrReader(boom)))
	es, err := readAll(rd)
	if len(es) != 2 || !errors.Is(err, boom) {
		t.Errorf("%d entries then %v, want 2 then boom", len(es), err)
	}
}

// A reader that makes no progress is not spun on forever.
type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

func TestReaderNoProgress(t *testing.T) {
	if _, err := NewReader(zeroReader{}).Next(); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("%v, want io.ErrNoProgress", err)
	}
}
