package ima

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"encoding/binary"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const (
	testBin  = "guest-imasig-sha256.bin"
	testTxt  = "guest-imasig-sha256.txt"
	testPCRs = "guest-imasig-sha256.pcrs.txt"

	// Facts about the captured list, from the README that came with it
	// (shared/testdata/ima/README.md).
	testEntries = 454
	testSigned  = 188
	testBinSHA  = "5696c29284f21a9b9b6607c1d66c256a06a66982eba7e15431f4aa4fa9bf9ce7"
	testTxtSHA  = "9a1953e0001a076f428911e3e6c22a997af20847288b25a9f55d2dac87f467ff"
)

func readTestdata(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatalf("read test data: %v", err)
	}
	return b
}

// testPCRValues returns bank name -> PCR index -> value from the .pcrs.txt.
func testPCRValues(tb testing.TB) map[string]map[int][]byte {
	tb.Helper()
	out := map[string]map[int][]byte{}
	sc := bufio.NewScanner(bytes.NewReader(readTestdata(tb, testPCRs)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 {
			tb.Fatalf("bad pcrs line %q", sc.Text())
		}
		idx, err := strconv.Atoi(f[1])
		if err != nil {
			tb.Fatalf("bad pcrs line %q: %v", sc.Text(), err)
		}
		v, err := hex.DecodeString(f[2])
		if err != nil {
			tb.Fatalf("bad pcrs line %q: %v", sc.Text(), err)
		}
		if out[f[0]] == nil {
			out[f[0]] = map[int][]byte{}
		}
		out[f[0]][idx] = v
	}
	if err := sc.Err(); err != nil {
		tb.Fatal(err)
	}
	return out
}

// entryBounds returns the byte offset of every entry start plus the total
// length, computed independently of the parser from the header lengths.
func entryBounds(tb testing.TB, b []byte) []int {
	tb.Helper()
	var out []int
	off := 0
	for off < len(b) {
		out = append(out, off)
		p := off + 4 + 20
		nl := int(binary.LittleEndian.Uint32(b[p:]))
		p += 4 + nl
		if string(b[p-nl:p]) == "ima" {
			p += 20
			p += 4 + int(binary.LittleEndian.Uint32(b[p:]))
		} else {
			p += 4 + int(binary.LittleEndian.Uint32(b[p:]))
		}
		off = p
	}
	if off != len(b) {
		tb.Fatalf("test data does not end at an entry boundary")
	}
	return append(out, len(b))
}

// rawEntry writes an entry header and data with explicit length fields, so
// tests can make them lie. dataLen < 0 omits the data length (legacy form).
func rawEntry(pcr uint32, hash []byte, nameLen uint32, name string, dataLen int64, data []byte) []byte {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, pcr)
	b = append(b, hash...)
	b = binary.LittleEndian.AppendUint32(b, nameLen)
	b = append(b, name...)
	if dataLen >= 0 {
		b = binary.LittleEndian.AppendUint32(b, uint32(dataLen))
	}
	return append(b, data...)
}

// fields joins template fields, each with its u32 length.
func fields(fs ...[]byte) []byte {
	var b []byte
	for _, f := range fs {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

// entryOf makes a well-formed entry of any template with a correct SHA-1
// template hash, in binary form.
func entryOf(pcr uint32, name string, data []byte) []byte {
	sum := sha1.Sum(data)
	return rawEntry(pcr, sum[:], uint32(len(name)), name, int64(len(data)), data)
}

// legacyEntry makes a legacy "ima" entry in binary form with its hash
// computed independently: SHA-1(digest || name zero-padded to 256 bytes).
func legacyEntry(pcr uint32, digest []byte, name string) []byte {
	var pad [256]byte
	copy(pad[:], name)
	h := sha1.New()
	h.Write(digest)
	h.Write(pad[:])
	var data []byte
	data = append(data, digest...)
	data = binary.LittleEndian.AppendUint32(data, uint32(len(name)))
	data = append(data, name...)
	return rawEntry(pcr, h.Sum(nil), 3, "ima", -1, data)
}

func dng(alg string, digest []byte) []byte {
	return append([]byte(alg+":\x00"), digest...)
}

func cstr(s string) []byte { return append([]byte(s), 0) }

func seq(n int, start byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = start + byte(i)
	}
	return b
}

func mustParse(tb testing.TB, b []byte) []Entry {
	tb.Helper()
	es, err := ParseList(b)
	if err != nil {
		tb.Fatalf("ParseList: %v", err)
	}
	return es
}
