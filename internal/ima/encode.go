package ima

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strconv"
)

// MarshalBinary returns the entry in the kernel's binary list format, byte for
// byte as binary_runtime_measurements holds it, so decoding a list and
// re-encoding its entries reproduces the list. It fails, wrapping ErrInvalid
// or ErrTooLarge, for an entry the parser would reject.
func (e Entry) MarshalBinary() ([]byte, error) {
	b, err := e.AppendBinary(make([]byte, 0, e.BinarySize()))
	if err != nil {
		return nil, err
	}
	return b, nil
}

// AppendBinary appends the binary form of the entry (see
// [Entry.MarshalBinary]) to b.
func (e Entry) AppendBinary(b []byte) ([]byte, error) {
	if err := e.check(); err != nil {
		return b, fmt.Errorf("ima: marshal %s entry: %w", strconv.Quote(e.TemplateName), err)
	}
	b = binary.LittleEndian.AppendUint32(b, e.PCR)
	b = append(b, e.TemplateHash...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(e.TemplateName)))
	b = append(b, e.TemplateName...)
	if e.TemplateName != legacyTemplate {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(e.TemplateData)))
	}
	return append(b, e.TemplateData...), nil
}

// check applies the parser's rules to an entry, so that whatever
// AppendBinary writes parses back.
func (e Entry) check() error {
	if len(e.TemplateHash) == 0 || len(e.TemplateHash) > MaxTemplateHashSize {
		return fmt.Errorf("template hash of %d bytes, want 1..%d: %w", len(e.TemplateHash), MaxTemplateHashSize, ErrInvalid)
	}
	if e.PCR >= MaxPCR {
		return fmt.Errorf("PCR index %d is not below %d: %w", e.PCR, MaxPCR, ErrInvalid)
	}
	if len(e.TemplateName) > MaxTemplateNameLen {
		return fmt.Errorf("template name of %d bytes exceeds %d: %w", len(e.TemplateName), MaxTemplateNameLen, ErrTooLarge)
	}
	if e.TemplateName == "" {
		return fmt.Errorf("empty template name: %w", ErrInvalid)
	}
	for i := 0; i < len(e.TemplateName); i++ {
		if c := e.TemplateName[i]; c <= ' ' || c > '~' {
			return fmt.Errorf("template name has byte 0x%02x: %w", c, ErrInvalid)
		}
	}
	if len(e.TemplateData) > MaxTemplateDataLen {
		return fmt.Errorf("template data of %d bytes exceeds %d: %w", len(e.TemplateData), MaxTemplateDataLen, ErrTooLarge)
	}
	if _, err := decodeTemplate(e.TemplateName, e.TemplateData); err != nil {
		return fmt.Errorf("%v: %w", err, ErrInvalid)
	}
	return nil
}

// ASCII returns the entry as one line of ascii_runtime_measurements, exactly
// as the kernel prints it, including the trailing newline: the PCR ("%2d"),
// the hex template hash, the template name, then a space and the rendering of
// each template field. An empty field prints nothing after its space, so an
// unsigned ima-sig entry ends in a space. Digests print as "alg:" and hex,
// names as text, signatures and buffers as hex, integers in decimal.
//
// The kernel never logs a template this package does not know; for one, or
// for template data that does not decode, each length-prefixed field (or else
// the whole data) prints as hex, which is not a kernel format.
func (e Entry) ASCII() string { return string(e.AppendASCII(nil)) }

// AppendASCII appends the ascii line of the entry (see [Entry.ASCII]) to b.
func (e Entry) AppendASCII(b []byte) []byte {
	b = fmt.Appendf(b, "%2d ", int32(e.PCR)) // the kernel prints an int with "%2d "
	b = hex.AppendEncode(b, e.TemplateHash)
	b = append(b, ' ')
	b = append(b, e.TemplateName...)
	f, err := decodeTemplate(e.TemplateName, e.TemplateData)
	if err != nil || f.Raw == nil {
		return append(appendRawASCII(b, e.TemplateData), '\n')
	}
	for _, fd := range f.Raw {
		b = append(b, ' ')
		if len(fd.Data) == 0 {
			continue
		}
		b = appendFieldASCII(b, fd)
	}
	return append(b, '\n')
}

// appendFieldASCII renders one field as ima_show_template_data_ascii does.
func appendFieldASCII(b []byte, fd Field) []byte {
	format, _ := fieldFormat(fd.ID)
	v := fd.Data
	switch format {
	case fmtDigestWithAlgo, fmtDigestWithTypeAlg:
		nul := indexNUL(v) // validated: the prefix "alg:" ends just before it
		if nul < 0 {
			return hex.AppendEncode(b, v)
		}
		b = append(b, v[:nul]...)
		return hex.AppendEncode(b, v[nul+1:])
	case fmtString:
		if nul := indexNUL(v); nul >= 0 {
			v = v[:nul]
		}
		return append(b, v...)
	case fmtUint:
		switch len(v) {
		case 1:
			return strconv.AppendUint(b, uint64(v[0]), 10)
		case 2:
			return strconv.AppendUint(b, uint64(binary.LittleEndian.Uint16(v)), 10)
		case 4:
			return strconv.AppendUint(b, uint64(binary.LittleEndian.Uint32(v)), 10)
		case 8:
			return strconv.AppendUint(b, binary.LittleEndian.Uint64(v), 10)
		}
		return b
	default: // fmtDigest, fmtHex
		return hex.AppendEncode(b, v)
	}
}

// appendRawASCII renders template data of an unknown template: each
// length-prefixed field as " " + hex, or, if the data is not a sequence of
// such fields, " " + the hex of all of it.
func appendRawASCII(b []byte, data []byte) []byte {
	var fields [][]byte
	for off := 0; off < len(data); {
		if len(data)-off < 4 {
			fields = nil
			break
		}
		n := binary.LittleEndian.Uint32(data[off:])
		if uint64(n) > uint64(len(data)-off-4) {
			fields = nil
			break
		}
		fields = append(fields, data[off+4:off+4+int(n)])
		off += 4 + int(n)
	}
	if fields == nil {
		if len(data) == 0 {
			return b
		}
		return hex.AppendEncode(append(b, ' '), data)
	}
	for _, f := range fields {
		b = hex.AppendEncode(append(b, ' '), f)
	}
	return b
}
