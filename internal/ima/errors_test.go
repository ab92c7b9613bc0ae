package ima

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestParseErrors(t *testing.T) {
	h20 := seq(20, 1)
	d32 := seq(32, 0x40)
	good := entryOf(10, "ima-ng", fields(dng("sha256", d32), cstr("/bin/true")))
	const dataAt = 4 + 20 + 4 + 7 + 4 // template data offset of an ima-sig entry

	tests := []struct {
		name   string
		in     []byte
		kind   error
		index  int
		at     int64  // byte offset the error names
		reason string // substring of the message
	}{
		{"truncated PCR", []byte{10, 0, 0}, ErrTruncated, 0, 3, "PCR"},
		{"truncated hash", rawEntry(10, h20[:9], 0, "", -1, nil), ErrTruncated, 0, 17, "template hash"},
		{"truncated name length", rawEntry(10, h20, 0, "", -1, nil)[:26], ErrTruncated, 0, 26, "name length"},
		{"truncated name", rawEntry(10, h20, 7, "ima-", -1, nil), ErrTruncated, 0, 32, "template name"},
		{"truncated data length", rawEntry(10, h20, 6, "ima-ng", -1, []byte{1, 2}), ErrTruncated, 0, 36, "data length"},
		{"truncated data", rawEntry(10, h20, 6, "ima-ng", 100, seq(50, 0)), ErrTruncated, 0, 88, "template data"},
		{"truncated second entry", append(append([]byte(nil), good...), good[:40]...), ErrTruncated, 1, int64(len(good) + 40), "template data"},
		{"oversize name", rawEntry(10, h20, 256, strings.Repeat("a", 256), 0, nil), ErrTooLarge, 0, 24, "name length 256 exceeds 255"},
		{"huge name length", rawEntry(10, h20, 0xffffffff, "", -1, nil), ErrTooLarge, 0, 24, "exceeds"},
		{"oversize data", rawEntry(10, h20, 7, "ima-sig", MaxTemplateDataLen+1, nil), ErrTooLarge, 0, dataAt - 4, "data length 2097153 exceeds"},
		{"huge data length", rawEntry(10, h20, 7, "ima-sig", 0xffffffff, nil), ErrTooLarge, 0, dataAt - 4, "exceeds"},
		{"empty name", rawEntry(10, h20, 0, "", 0, nil), ErrInvalid, 0, 24, "empty template name"},
		{"space in name", entryOf(10, "ima ng", nil), ErrInvalid, 0, 31, "0x20"},
		{"NUL in name", entryOf(10, "ima\x00ng", nil), ErrInvalid, 0, 31, "0x00"},
		{"PCR 64", entryOf(64, "ima-ng", nil), ErrInvalid, 0, 0, "PCR index 64"},
		{"d-ng without colon", entryOf(10, "ima-sig", fields([]byte("sha256\x00"), cstr("/x"), nil)), ErrInvalid, 0, dataAt, "does not end in ':'"},
		{"d-ng without NUL", entryOf(10, "ima-sig", fields([]byte("sha256:"), cstr("/x"), nil)), ErrInvalid, 0, dataAt, "no NUL"},
		{"d-ng empty alg", entryOf(10, "ima-sig", fields(dng("", d32), cstr("/x"), nil)), ErrInvalid, 0, dataAt, "bad name"},
		{"d-ng upper-case alg", entryOf(10, "ima-sig", fields(dng("SHA256", d32), cstr("/x"), nil)), ErrInvalid, 0, dataAt, "bad name"},
		{"d-ng two colons", entryOf(10, "ima-sig", fields(dng("ima:sha256", d32), cstr("/x"), nil)), ErrInvalid, 0, dataAt, "want 1"},
		{"d-ng empty", entryOf(10, "ima-sig", fields(nil, cstr("/x"), nil)), ErrInvalid, 0, dataAt, "empty digest"},
		{"d-ng length past data", entryOf(10, "ima-sig", binary.LittleEndian.AppendUint32(nil, 40)), ErrInvalid, 0, dataAt, "exceeds the 0 bytes left"},
		{"n-ng without NUL", entryOf(10, "ima-sig", fields(dng("sha256", d32), []byte("/x"), nil)), ErrInvalid, 0, dataAt + 44, "not NUL-terminated"},
		{"n-ng empty", entryOf(10, "ima-sig", fields(dng("sha256", d32), nil, nil)), ErrInvalid, 0, dataAt + 44, "not NUL-terminated"},
		{"NUL inside n-ng", entryOf(10, "ima-sig", fields(dng("sha256", d32), cstr("/a\x00b"), nil)), ErrInvalid, 0, dataAt + 44, "NUL inside name"},
		{"missing sig field", entryOf(10, "ima-sig", fields(dng("sha256", d32), cstr("/x"))), ErrInvalid, 0, dataAt + 51, "missing length"},
		{"trailing bytes", entryOf(10, "ima-ng", append(fields(dng("sha256", d32), cstr("/x")), 0)), ErrInvalid, 0, dataAt - 1 + 51, "1 bytes after the last field"},
		{"d-ngv2 without type", entryOf(10, "ima-ngv2", fields(dng("sha256", d32), cstr("/x"))), ErrInvalid, 0, dataAt + 1, "want 2"},
		{"odd-size uint", entryOf(10, "evm-sig", fields(dng("sha256", d32), cstr("/x"), nil, nil, nil, nil, []byte{1, 2, 3}, nil, nil)), ErrInvalid, 0, -1, "integer field of 3 bytes"},
		{"legacy name too long", rawEntry(10, h20, 3, "ima", -1, binary.LittleEndian.AppendUint32(seq(20, 0), 256)), ErrTooLarge, 0, 51, "legacy event name length 256"},
		{"legacy truncated", legacyEntry(10, seq(20, 0), "/bin/sh")[:60], ErrTruncated, 0, 60, "legacy event name"},
		{"legacy NUL in name", legacyEntry(10, seq(20, 0), "/bin\x00sh"), ErrInvalid, 0, 55 + 4, "NUL inside legacy event name"},
		{"bad second entry", append(append([]byte(nil), good...), rawEntry(10, h20, 300, "", -1, nil)...), ErrTooLarge, 1, int64(len(good) + 24), "300"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			es, err := ParseList(tc.in)
			if len(es) != tc.index {
				t.Errorf("%d entries before the error, want %d", len(es), tc.index)
			}
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v (%T), want *ParseError", err, err)
			}
			for _, k := range []error{ErrTruncated, ErrTooLarge, ErrInvalid} {
				if errors.Is(err, k) != (k == tc.kind) {
					t.Errorf("errors.Is(%v, %v) = %v", err, k, !(k == tc.kind))
				}
			}
			if pe.Index != tc.index {
				t.Errorf("index %d, want %d", pe.Index, tc.index)
			}
			if tc.at >= 0 && pe.At != tc.at {
				t.Errorf("at %d, want %d (%v)", pe.At, tc.at, err)
			}
			if !strings.Contains(err.Error(), tc.reason) {
				t.Errorf("error %q does not mention %q", err, tc.reason)
			}
			// The reader agrees with ParseList.
			rd := NewReader(bytes.NewReader(tc.in))
			res, rerr := readAll(rd)
			if len(res) != tc.index || rerr == nil || rerr.Error() != err.Error() {
				t.Errorf("Reader: %d entries, %v; ParseList: %v", len(res), rerr, err)
			}
		})
	}
}

func TestParseListEmpty(t *testing.T) {
	es, err := ParseList(nil)
	if err != nil || len(es) != 0 {
		t.Fatalf("ParseList(nil) = %v, %v", es, err)
	}
}

func TestMarshalErrors(t *testing.T) {
	ok := NewIMANG(10, "sha256", seq(32, 0), "/bin/true")
	tests := []struct {
		name string
		mod  func(e *Entry)
		kind error
	}{
		{"no hash", func(e *Entry) { e.TemplateHash = nil }, ErrInvalid},
		{"long hash", func(e *Entry) { e.TemplateHash = make([]byte, 65) }, ErrInvalid},
		{"PCR", func(e *Entry) { e.PCR = MaxPCR }, ErrInvalid},
		{"empty name", func(e *Entry) { e.TemplateName = "" }, ErrInvalid},
		{"long name", func(e *Entry) { e.TemplateName = strings.Repeat("x", 256) }, ErrTooLarge},
		{"name with newline", func(e *Entry) { e.TemplateName = "ima\nng" }, ErrInvalid},
		{"big data", func(e *Entry) { e.TemplateName = "other"; e.TemplateData = make([]byte, MaxTemplateDataLen+1) }, ErrTooLarge},
		{"bad fields", func(e *Entry) { e.TemplateData = e.TemplateData[:10] }, ErrInvalid},
		{"bad legacy", func(e *Entry) { e.TemplateName = "ima" }, ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := ok
			tc.mod(&e)
			b, err := e.MarshalBinary()
			if !errors.Is(err, tc.kind) {
				t.Fatalf("MarshalBinary: %v, want %v", err, tc.kind)
			}
			if b != nil {
				t.Errorf("MarshalBinary returned %d bytes with an error", len(b))
			}
		})
	}
}
