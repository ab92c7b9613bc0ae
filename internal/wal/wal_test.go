package wal

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func payload(i int) []byte { return fmt.Appendf(nil, "frame %d %s", i, strings.Repeat("x", i%37)) }

// write opens a log in dir and appends n frames in groups of group.
func write(t *testing.T, dir string, opts Options, n, group int) *Log {
	t.Helper()
	l, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i += group {
		var ps [][]byte
		for j := i; j < min(n, i+group); j++ {
			ps = append(ps, payload(j))
		}
		first, err := l.Append(ps...)
		if err != nil {
			t.Fatal(err)
		}
		if first != uint64(i+1) {
			t.Fatalf("group at %d got first seq %d", i, first)
		}
	}
	return l
}

func checkFrames(t *testing.T, fr []Frame, n int) {
	t.Helper()
	if len(fr) != n {
		t.Fatalf("%d frames, want %d", len(fr), n)
	}
	for i, f := range fr {
		if f.Seq != uint64(i+1) || !bytes.Equal(f.Payload, payload(i)) {
			t.Fatalf("frame %d: seq %d payload %q", i, f.Seq, f.Payload)
		}
	}
}

func lastSegment(t *testing.T, dir string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if len(m) == 0 {
		t.Fatal("no segment")
	}
	return m[len(m)-1]
}

// TestReopen: frames survive a close and reopen, across rotated segments,
// and appending continues the numbering.
func TestReopen(t *testing.T) {
	for _, tc := range []struct {
		name     string
		n, group int
		segSize  int64
		wantSegs int
	}{
		{"one segment", 10, 3, 0, 1},
		{"rotated", 200, 7, 512, 0},
		{"single frames", 50, 1, 256, 0},
		{"empty", 0, 1, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{SegmentSize: tc.segSize}
			l := write(t, dir, opts, tc.n, tc.group)
			segs := l.Segments()
			if tc.wantSegs > 0 && segs != tc.wantSegs {
				t.Errorf("%d segments, want %d", segs, tc.wantSegs)
			}
			if tc.wantSegs == 0 && segs < 2 {
				t.Errorf("%d segments: no rotation", segs)
			}
			l.Close()
			l, err := Open(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			checkFrames(t, l.Frames(), tc.n)
			if l.Next() != uint64(tc.n+1) {
				t.Fatalf("next %d, want %d", l.Next(), tc.n+1)
			}
			if _, err := l.Append(payload(tc.n)); err != nil {
				t.Fatal(err)
			}
			l.Close()
			l, err = Open(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			checkFrames(t, l.Frames(), tc.n+1)
			l.Close()
		})
	}
}

// TestTornTailVersusDamage: damage at the very end of the newest segment
// is a torn write and is truncated, keeping every frame before it; damage
// with a valid frame after it is a hard error naming the file and offset.
func TestTornTailVersusDamage(t *testing.T) {
	const n = 20
	for _, tc := range []struct {
		name string
		// mangle changes the newest segment's bytes.
		mangle func(b []byte) []byte
		keep   int    // frames expected after reopen; -1: Open fails
		errHas string // substring of the error
	}{
		{"intact", func(b []byte) []byte { return b }, n, ""},
		{"cut inside the last frame's payload", func(b []byte) []byte { return b[:len(b)-3] }, n - 1, ""},
		{"cut inside the last frame's header", func(b []byte) []byte { return b[:len(b)-len(payload(n-1))-5] }, n - 1, ""},
		{"garbage appended", func(b []byte) []byte { return append(b, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3) }, n, ""},
		{"zeros appended", func(b []byte) []byte { return append(b, make([]byte, 4096)...) }, n, ""},
		{"last frame's payload flipped", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, n - 1, ""},
		{"a middle frame's payload flipped", func(b []byte) []byte { b[len(segMagic)+headerSize+2] ^= 0x40; return b }, -1, "offset " + fmt.Sprint(len(segMagic))},
		{"a middle frame's length changed", func(b []byte) []byte { b[len(segMagic)] ^= 0x08; return b }, -1, "a whole later write follows"},
		// Groups of 4: frames 17-20 are the last write. A power loss may
		// keep its later pages and lose an earlier one.
		{"last write's first frame lost, the rest kept", func(b []byte) []byte {
			return zeroFrame(b, 17)
		}, 16, ""},
		{"last write's middle frame lost", func(b []byte) []byte { return zeroFrame(b, 19) }, 18, ""},
		{"an earlier write's frame lost", func(b []byte) []byte { return zeroFrame(b, 15) }, -1, "a whole later write follows"},
		{"header damaged", func(b []byte) []byte { b[0] = 'X'; return b }, -1, "not a tpmmux write-ahead log segment"},
		{"header cut at creation", func(b []byte) []byte { return b[:5] }, 0, ""},
	} {
		for _, prealloc := range []bool{false, true} {
			name := tc.name
			if prealloc {
				name += ", preallocated"
			}
			t.Run(name, func(t *testing.T) {
				tornTailCase(t, prealloc, n, tc.mangle, tc.keep, tc.errHas)
			})
		}
	}
}

// tornTailCase writes n frames in writes of 4, mangles the newest
// segment's frames (in a preallocated segment: its bytes up to the end of
// the frames, the rest zeros to the same size, as a cut write into
// zero-filled space leaves them) and checks what Open keeps (keep < 0: a
// refusal naming the file and errHas).
func tornTailCase(t *testing.T, prealloc bool, n int, mangle func([]byte) []byte, keep int, errHas string) {
	dir := t.TempDir()
	opts := Options{NoPreallocate: !prealloc}
	write(t, dir, opts, n, 4).Close()
	path := lastSegment(t, dir)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	end := len(segMagic)
	for i := range n {
		end += headerSize + len(payload(i))
	}
	if prealloc != (len(b) > end) {
		t.Fatalf("segment of %d bytes, frames end at %d (preallocated %v)", len(b), end, prealloc)
	}
	mb := mangle(bytes.Clone(b[:end]))
	if prealloc {
		mb = append(mb, make([]byte, max(0, len(b)-len(mb)))...)
	}
	if err := os.WriteFile(path, mb, 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := Open(dir, opts)
	if keep < 0 {
		if err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), errHas) {
			t.Fatalf("Open = %v, want ErrCorrupt naming %s and %q", err, path, errHas)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, l.Frames(), keep)
	if fi, err := os.Stat(path); err == nil && prealloc && len(b) > 16 && fi.Size() < int64(len(b)) {
		// A cut torn tail is zero-filled again (not for a header cut at
		// creation, which a crash left before any frame).
		t.Errorf("torn tail cut the zero-filled segment from %d to %d bytes", len(b), fi.Size())
	}
	// The tail is gone from the file: appending continues after the
	// kept frames and a reopen reads them all.
	if _, err := l.Append(payload(keep)); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l, err = Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, l.Frames(), keep+1)
	l.Close()
}

// zeroFrame zeroes frame seq's bytes in segment bytes b (frames 1.. of
// payload(i-1), starting after the header).
func zeroFrame(b []byte, seq int) []byte {
	off := len(segMagic)
	for i := 1; i < seq; i++ {
		off += headerSize + len(payload(i-1))
	}
	clear(b[off : off+headerSize+len(payload(seq-1))])
	return b
}

// TestDamageInOlderSegment: an older segment is complete by construction
// (it was synced before the next one began), so any bad frame in it is a
// hard error, even at its end.
func TestDamageInOlderSegment(t *testing.T) {
	dir := t.TempDir()
	l := write(t, dir, Options{SegmentSize: 300}, 60, 3)
	if l.Segments() < 3 {
		t.Fatalf("%d segments", l.Segments())
	}
	l.Close()
	m, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	b, _ := os.ReadFile(m[0])
	os.WriteFile(m[0], b[:len(b)-2], 0o600)
	if _, err := Open(dir, Options{}); err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), m[0]) {
		t.Fatalf("Open = %v, want ErrCorrupt naming %s", err, m[0])
	}
	// A missing middle segment is a gap.
	os.WriteFile(m[0], b, 0o600)
	os.Remove(m[1])
	if _, err := Open(dir, Options{}); err == nil || !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open with a missing segment = %v, want ErrCorrupt", err)
	}
}

// TestRelease: applied segments are deleted, never the one being written,
// and a reopen starts at the first kept frame.
func TestRelease(t *testing.T) {
	dir := t.TempDir()
	l := write(t, dir, Options{SegmentSize: 400}, 100, 5)
	segs := l.Segments()
	if segs < 3 {
		t.Fatalf("%d segments", segs)
	}
	if n, err := l.Release(1); err != nil || n != 0 {
		t.Fatalf("Release(1) deleted %d: %v", n, err)
	}
	n, err := l.Release(50)
	if err != nil || n == 0 {
		t.Fatalf("Release(50) deleted %d: %v", n, err)
	}
	l.Close()
	l, err = Open(dir, Options{SegmentSize: 400})
	if err != nil {
		t.Fatal(err)
	}
	fr := l.Frames()
	if fr[0].Seq > 50 || fr[len(fr)-1].Seq != 100 {
		t.Fatalf("frames %d..%d after Release(50)", fr[0].Seq, fr[len(fr)-1].Seq)
	}
	if n, err := l.Release(1 << 40); err != nil || l.Segments() != 1 {
		t.Fatalf("Release(all) deleted %d, %d left: %v", n, l.Segments(), err)
	}
	if _, err := l.Append(payload(100)); err != nil {
		t.Fatal(err)
	}
	l.Close()
	l, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	fr = l.Frames()
	if len(fr) == 0 || fr[len(fr)-1].Seq != 101 {
		t.Fatalf("after releasing all and appending: %v", fr)
	}
	// Rotate + Release of everything leaves no frame on disk.
	if err := l.Rotate(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Release(l.Next()); err != nil || l.Segments() != 1 {
		t.Fatalf("after Rotate, Release(next): %d segments, %v", l.Segments(), err)
	}
	l.Close()
	l, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if fr := l.Frames(); len(fr) != 0 || l.Next() != 102 {
		t.Fatalf("after Rotate and Release: %d frames, next %d", len(fr), l.Next())
	}
	l.Close()
}

// TestTornWriteHook: a group cut short by a crash in the middle of its
// write (the hook writes part of it and stops, as a kill would) keeps the
// frames before the cut and loses the rest.
func TestTornWriteHook(t *testing.T) {
	dir := t.TempDir()
	l := write(t, dir, Options{}, 10, 2)
	l.Close()
	l, err := Open(dir, Options{BeforeWrite: func(f *os.File, off int64, b []byte) {
		f.WriteAt(b[:len(Encode(nil, 11, payload(10)))+headerSize+3], off)
		panic("killed")
	}})
	if err != nil {
		t.Fatal(err)
	}
	l.Frames()
	func() {
		defer func() { recover() }()
		l.Append(payload(10), payload(11), payload(12))
	}()
	l.Close()
	l, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	checkFrames(t, l.Frames(), 11)
	l.Close()
}

// TestPreallocated: segments are created zero-filled to their full size,
// the zero tail is where the frames end (no truncation on reopen), the
// next segment is zero-filled in the background and renamed into place at
// rotation, a leftover zero-fill is deleted by Open, and a crash between
// the rename and the header leaves a segment Open repairs.
func TestPreallocated(t *testing.T) {
	const seg = 64 << 10
	size := func(t *testing.T, path string) int64 {
		t.Helper()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	t.Run("zero tail", func(t *testing.T) {
		dir := t.TempDir()
		opts := Options{SegmentSize: seg}
		l := write(t, dir, opts, 30, 3)
		l.Close()
		path := lastSegment(t, dir)
		if got := size(t, path); got != seg {
			t.Fatalf("segment of %d bytes, want %d (zero-filled)", got, seg)
		}
		for range 2 {
			l, err := Open(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			checkFrames(t, l.Frames(), 30)
			if l.Next() != 31 {
				t.Fatalf("next %d", l.Next())
			}
			l.Close()
			if got := size(t, path); got != seg {
				t.Fatalf("reopen changed the segment's size to %d", got)
			}
		}
	})
	t.Run("rotation takes the zero-filled segment", func(t *testing.T) {
		dir := t.TempDir()
		opts := Options{SegmentSize: seg}
		l, err := Open(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		big := bytes.Repeat([]byte{7}, 10<<10)
		for l.Segments() < 3 {
			if _, err := l.Append(big); err != nil {
				t.Fatal(err)
			}
			if l.prep != nil {
				// Let the zero-fill finish, as it does while a segment
				// fills in practice.
				l.prep <- <-l.prep
			}
		}
		m, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
		for _, p := range m[1:] {
			if got := size(t, p); got < seg {
				t.Errorf("%s: %d bytes, not zero-filled", p, got)
			}
		}
		next := l.Next()
		l.Close()
		l, err = Open(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		if fr := l.Frames(); len(fr) != int(next-1) || l.Next() != next {
			t.Fatalf("reopened: %d frames, next %d, want %d", len(fr), l.Next(), next)
		}
		l.Close()
	})
	t.Run("leftover zero-fill", func(t *testing.T) {
		dir := t.TempDir()
		opts := Options{SegmentSize: seg}
		write(t, dir, opts, 5, 1).Close()
		leftover := filepath.Join(dir, nextName)
		if err := os.WriteFile(leftover, []byte{0, 0, 0}, 0o600); err != nil {
			t.Fatal(err)
		}
		l, err := Open(dir, Options{SegmentSize: seg, NoPreallocate: true})
		if err != nil {
			t.Fatal(err)
		}
		checkFrames(t, l.Frames(), 5)
		l.Close()
		if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("leftover zero-fill kept: %v", err)
		}
	})
	t.Run("crash between rename and header", func(t *testing.T) {
		dir := t.TempDir()
		opts := Options{SegmentSize: seg}
		write(t, dir, opts, 5, 1).Close()
		// The next segment as the rename leaves it, header not written
		// (or cut short).
		for _, head := range []int{0, 6} {
			path := filepath.Join(dir, segName(6))
			b := make([]byte, seg)
			copy(b, segMagic[:head])
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			l, err := Open(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			checkFrames(t, l.Frames(), 5)
			if _, err := l.Append(payload(5)); err != nil {
				t.Fatal(err)
			}
			l.Close()
			l, err = Open(dir, opts)
			if err != nil {
				t.Fatal(err)
			}
			checkFrames(t, l.Frames(), 6)
			l.Close()
			if got := size(t, path); got != seg {
				t.Fatalf("repaired segment of %d bytes, want %d", got, seg)
			}
			os.Remove(path)
		}
	})
	t.Run("damage in a preallocated older segment", func(t *testing.T) {
		dir := t.TempDir()
		opts := Options{SegmentSize: seg}
		l, err := Open(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Append(payload(0)); err != nil {
			t.Fatal(err)
		}
		if err := l.Rotate(); err != nil {
			t.Fatal(err)
		}
		if _, err := l.Append(payload(1)); err != nil {
			t.Fatal(err)
		}
		l.Close()
		// The older segment's zero tail (Rotate before it was full) is
		// its end; a flipped byte in its frame is damage.
		l, err = Open(dir, opts)
		if err != nil {
			t.Fatal(err)
		}
		checkFrames(t, l.Frames(), 2)
		l.Close()
		m, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
		b, _ := os.ReadFile(m[0])
		b[len(segMagic)+headerSize] ^= 1
		os.WriteFile(m[0], b, 0o600)
		if _, err := Open(dir, opts); err == nil || !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), m[0]) {
			t.Fatalf("Open = %v, want ErrCorrupt naming %s", err, m[0])
		}
	})
}

// FuzzDecode: Decode never panics, and what it accepts re-encodes to the
// same bytes.
func FuzzDecode(f *testing.F) {
	f.Add(Encode(nil, 1, []byte("hello")))
	f.Add(Encode(nil, 1<<40, nil))
	f.Add(encode(nil, 7, []byte("not last"), false))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, n, err := Decode(b)
		if err != nil {
			return
		}
		if n > len(b) || !bytes.Equal(encode(nil, fr.Seq, fr.Payload, fr.Last), b[:n]) {
			t.Fatalf("decoded %d bytes that do not re-encode", n)
		}
	})
}
