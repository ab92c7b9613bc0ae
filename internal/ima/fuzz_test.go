package ima

import (
	"bytes"
	"crypto"
	"errors"
	"io"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the parser and the streaming reader:
// neither may panic, both must agree, every error must be a ParseError with
// one of the three sentinels, and whatever parses must re-marshal to exactly
// the bytes it came from.
//
//	go test -fuzz=FuzzParse ./internal/ima
func FuzzParse(f *testing.F) {
	bin := readTestdata(f, testBin)
	bounds := entryBounds(f, bin)
	f.Add(bin[:bounds[1]])          // boot_aggregate, unsigned
	f.Add(bin[:bounds[3]])          // includes a signed entry
	f.Add(bin[bounds[2]:bounds[3]]) // one signed entry
	f.Add(bin[:bounds[2]+100])      // truncated inside an entry
	f.Add(legacyEntry(10, seq(20, 0), "/bin/sh"))
	f.Add(entryOf(10, "ima-ng", fields(dng("sha256", seq(32, 0)), cstr("/usr/bin/env"))))
	f.Add(entryOf(10, "ima-buf", fields(dng("sha256", seq(32, 0)), cstr("kexec-cmdline"), []byte("ro quiet"))))
	f.Add(entryOf(10, "ima-modsig", fields(dng("sha256", seq(32, 0)), cstr("/m.ko"), nil, dng("sha512", seq(64, 0)), seq(30, 0))))
	f.Add(entryOf(10, "ima-sigv2", fields(dng("ima:sha256", seq(32, 0)), cstr("/x"), seq(8, 0))))
	f.Add(entryOf(10, "evm-sig", fields(dng("sha256", seq(32, 0)), cstr("/x"), nil, []byte("security.ima"), nil, nil, seq(4, 0), seq(4, 0), seq(2, 0))))
	f.Add(entryOf(10, "d-ng|n-ng|iuid", fields(dng("sha256", seq(32, 0)), cstr("/x"), seq(8, 0))))
	f.Add(entryOf(10, "unknown", []byte{1, 2, 3}))
	f.Add(rawEntry(10, make([]byte, 20), 7, "ima-sig", 51, fields(dng("sha256", make([]byte, 20)), cstr("/v"), nil)))

	f.Fuzz(func(t *testing.T, data []byte) {
		es, err := ParseList(data)
		var out []byte
		for i, e := range es {
			var merr error
			if out, merr = e.AppendBinary(out); merr != nil {
				t.Fatalf("entry %d parsed but does not marshal: %v", i, merr)
			}
			line := e.ASCII()
			if len(line) == 0 || line[len(line)-1] != '\n' {
				t.Fatalf("entry %d: ASCII %q", i, line)
			}
			_ = e.VerifyTemplateHash()
			if e.TemplateDigest(crypto.SHA256) == nil {
				t.Fatalf("entry %d: no sha256 template digest", i)
			}
		}
		if err == nil {
			if !bytes.Equal(out, data) {
				t.Fatalf("re-marshalled list differs:\n got %x\nwant %x", out, data)
			}
			if Replay(es, crypto.SHA1) == nil {
				t.Fatal("no replay")
			}
		} else {
			if !bytes.Equal(out, data[:len(out)]) {
				t.Fatal("entries before the error do not re-marshal to the input prefix")
			}
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("error %T %v is not a ParseError", err, err)
			}
			n := 0
			for _, k := range []error{ErrTruncated, ErrTooLarge, ErrInvalid} {
				if errors.Is(err, k) {
					n++
				}
			}
			if n != 1 || pe.Index != len(es) || pe.Offset != int64(len(out)) || pe.At < pe.Offset || pe.At > int64(len(data)) {
				t.Fatalf("error %v: sentinels %d, index %d offset %d at %d; %d entries, %d bytes", err, n, pe.Index, pe.Offset, pe.At, len(es), len(out))
			}
		}

		rd := NewReader(bytes.NewReader(data))
		res, rerr := readAll(rd)
		if len(res) != len(es) {
			t.Fatalf("reader %d entries, ParseList %d", len(res), len(es))
		}
		if err == nil {
			if rerr != io.EOF {
				t.Fatalf("reader error %v, ParseList none", rerr)
			}
		} else if rerr == nil || rerr.Error() != err.Error() {
			t.Fatalf("reader error %v, ParseList %v", rerr, err)
		}
	})
}

func BenchmarkParse(b *testing.B) {
	bin := readTestdata(b, testBin)
	b.SetBytes(int64(len(bin)))
	b.ReportAllocs()
	for b.Loop() {
		es, err := ParseList(bin)
		if err != nil || len(es) != testEntries {
			b.Fatal(err)
		}
	}
}

func BenchmarkReader(b *testing.B) {
	bin := readTestdata(b, testBin)
	b.SetBytes(int64(len(bin)))
	b.ReportAllocs()
	for b.Loop() {
		rd := NewReader(bytes.NewReader(bin))
		n := 0
		for {
			_, err := rd.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			n++
		}
		if n != testEntries {
			b.Fatal(n)
		}
	}
}

func BenchmarkASCII(b *testing.B) {
	es := mustParse(b, readTestdata(b, testBin))
	b.ReportAllocs()
	var buf []byte
	for b.Loop() {
		buf = buf[:0]
		for _, e := range es {
			buf = e.AppendASCII(buf)
		}
	}
	b.SetBytes(int64(len(buf)))
}

func BenchmarkReplay(b *testing.B) {
	es := mustParse(b, readTestdata(b, testBin))
	b.ReportAllocs()
	for b.Loop() {
		if Replay(es, crypto.SHA256) == nil {
			b.Fatal("nil")
		}
	}
}
