package ima

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// legacyTemplate is the name of the original template, whose binary form and
// template hash differ from all others.
const legacyTemplate = "ima"

// Kernel limits on template descriptors (ima.h).
const (
	maxTemplateFields = 15                  // IMA_TEMPLATE_NUM_FIELDS_MAX
	maxFieldIDLen     = 16                  // IMA_TEMPLATE_FIELD_ID_MAX_LEN
	maxAlgNameLen     = 64                  // well under CRYPTO_MAX_ALG_NAME; real names are <= 11 bytes
	legacyDigestSize  = 20                  // the "d" field of the "ima" template on the wire
	legacyNameField   = MaxEventNameLen + 1 // the zero-padded name in the legacy template hash
)

// dataFormat is how the kernel renders a field in the ascii list
// (enum data_formats in ima_template_lib.c).
type dataFormat int

const (
	fmtDigest            dataFormat = iota // d: hex
	fmtDigestWithAlgo                      // d-ng, d-modsig: "alg:" NUL digest
	fmtDigestWithTypeAlg                   // d-ngv2: "type:alg:" NUL digest
	fmtString                              // n, n-ng, xattrnames: NUL-terminated string
	fmtHex                                 // sig, buf, modsig, evmsig, xattrlengths, xattrvalues
	fmtUint                                // iuid, igid, imode: little-endian integer
)

// fieldFormat returns the data format of a template field id, and false for
// an id the kernel does not define (supported_fields in ima_template.c).
func fieldFormat(id string) (dataFormat, bool) {
	switch id {
	case "d":
		return fmtDigest, true
	case "d-ng", "d-modsig":
		return fmtDigestWithAlgo, true
	case "d-ngv2":
		return fmtDigestWithTypeAlg, true
	case "n", "n-ng", "xattrnames":
		return fmtString, true
	case "sig", "buf", "modsig", "evmsig", "xattrlengths", "xattrvalues":
		return fmtHex, true
	case "iuid", "igid", "imode":
		return fmtUint, true
	}
	return 0, false
}

// builtinFormat returns the format string of a builtin template
// (builtin_templates in ima_template.c), or "" for another name.
func builtinFormat(name string) string {
	switch name {
	case "ima":
		return "d|n"
	case "ima-ng":
		return "d-ng|n-ng"
	case "ima-sig":
		return "d-ng|n-ng|sig"
	case "ima-ngv2":
		return "d-ngv2|n-ng"
	case "ima-sigv2":
		return "d-ngv2|n-ng|sig"
	case "ima-buf":
		return "d-ng|n-ng|buf"
	case "ima-modsig":
		return "d-ng|n-ng|sig|d-modsig|modsig"
	case "evm-sig":
		return "d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode"
	}
	return ""
}

// templateFields returns the field ids of a template, from its builtin name or,
// for a custom template (logged under its format string), from the name
// itself. It returns nil for a template this package does not know.
func templateFields(name string) []string {
	f := builtinFormat(name)
	if f == "" {
		f = name
	}
	ids := strings.Split(f, "|")
	if len(ids) > maxTemplateFields {
		return nil
	}
	for _, id := range ids {
		if len(id) == 0 || len(id) > maxFieldIDLen {
			return nil
		}
		if _, ok := fieldFormat(id); !ok {
			return nil
		}
	}
	return ids
}

// KnownTemplate reports whether the package can decode the fields of a
// template: a builtin template, or a custom format string made of field ids
// the kernel defines. Entries of other templates are kept as raw data.
func KnownTemplate(name string) bool { return templateFields(name) != nil }

// fieldError is a problem inside template data; off is relative to the start
// of the template data.
type fieldError struct {
	off    int
	reason string
}

func (e *fieldError) Error() string { return fmt.Sprintf("template data byte %d: %s", e.off, e.reason) }

// Unwrap makes a field error match ErrInvalid.
func (e *fieldError) Unwrap() error { return ErrInvalid }

// decodeTemplate splits and checks the template data of a known template. It
// returns zero Fields and no error for an unknown template.
func decodeTemplate(name string, data []byte) (Fields, error) {
	if name == legacyTemplate {
		return decodeLegacy(data)
	}
	ids := templateFields(name)
	if ids == nil {
		return Fields{}, nil
	}
	var f Fields
	f.Raw = make([]Field, 0, len(ids))
	off := 0
	for i, id := range ids {
		if len(data)-off < 4 {
			return Fields{}, &fieldError{off, fmt.Sprintf("field %d (%s): missing length, template %q has %d fields", i, id, name, len(ids))}
		}
		n := binary.LittleEndian.Uint32(data[off:])
		if uint64(n) > uint64(len(data)-off-4) {
			return Fields{}, &fieldError{off, fmt.Sprintf("field %d (%s): length %d exceeds the %d bytes left in the template data", i, id, n, len(data)-off-4)}
		}
		v := data[off+4 : off+4+int(n)]
		if err := f.set(id, v); err != nil {
			return Fields{}, &fieldError{off, fmt.Sprintf("field %d (%s): %s", i, id, err.reason)}
		}
		f.Raw = append(f.Raw, Field{ID: id, Data: v})
		off += 4 + int(n)
	}
	if off != len(data) {
		return Fields{}, &fieldError{off, fmt.Sprintf("%d bytes after the last field of template %q", len(data)-off, name)}
	}
	return f, nil
}

// decodeLegacy decodes the wire form of the "ima" template: 20-byte digest,
// u32 name length, name without NUL.
func decodeLegacy(data []byte) (Fields, error) {
	if len(data) < legacyDigestSize+4 {
		return Fields{}, &fieldError{0, fmt.Sprintf("legacy ima data of %d bytes is shorter than digest and name length", len(data))}
	}
	n := binary.LittleEndian.Uint32(data[legacyDigestSize:])
	if n > MaxEventNameLen {
		return Fields{}, &fieldError{legacyDigestSize, fmt.Sprintf("legacy event name length %d exceeds %d", n, MaxEventNameLen)}
	}
	if int(n) != len(data)-legacyDigestSize-4 {
		return Fields{}, &fieldError{legacyDigestSize, fmt.Sprintf("legacy event name length %d does not match the %d bytes left", n, len(data)-legacyDigestSize-4)}
	}
	name := data[legacyDigestSize+4:]
	if i := indexNUL(name); i >= 0 {
		return Fields{}, &fieldError{legacyDigestSize + 4 + i, "NUL inside legacy event name"}
	}
	d := data[:legacyDigestSize]
	return Fields{
		DigestAlg: "sha1",
		Digest:    d,
		Path:      string(name),
		Raw:       []Field{{ID: "d", Data: d}, {ID: "n", Data: name}},
	}, nil
}

// set checks one field's bytes against its format and records its value.
func (f *Fields) set(id string, v []byte) *fieldError {
	format, _ := fieldFormat(id)
	switch format {
	case fmtDigest:
		if len(v) == 0 {
			return &fieldError{reason: "empty digest"}
		}
		f.Digest = v
		switch len(v) {
		case 20:
			f.DigestAlg = "sha1"
		case 16:
			f.DigestAlg = "md5"
		}
	case fmtDigestWithAlgo, fmtDigestWithTypeAlg:
		if len(v) == 0 {
			if id == "d-modsig" { // written empty when the file has no appended signature
				return nil
			}
			return &fieldError{reason: "empty digest field"}
		}
		typ, alg, digest, err := splitDigest(v, format == fmtDigestWithTypeAlg)
		if err != nil {
			return err
		}
		if id == "d-modsig" {
			f.ModsigDigestAlg, f.ModsigDigest = alg, digest
		} else {
			f.DigestType, f.DigestAlg, f.Digest = typ, alg, digest
		}
	case fmtString:
		if id == "xattrnames" { // stored without a guaranteed NUL; shown up to the first NUL
			return nil
		}
		if len(v) == 0 || v[len(v)-1] != 0 {
			return &fieldError{reason: "name is not NUL-terminated"}
		}
		if i := indexNUL(v[:len(v)-1]); i >= 0 {
			return &fieldError{reason: fmt.Sprintf("NUL inside name at byte %d", i)}
		}
		f.Path = string(v[:len(v)-1])
	case fmtHex:
		if len(v) == 0 { // an unsigned file's sig, an ima-modsig entry without modsig
			return nil
		}
		switch id {
		case "sig":
			f.Sig = v
		case "buf":
			f.Buf = v
		case "modsig":
			f.Modsig = v
		}
	case fmtUint:
		switch len(v) {
		case 0, 1, 2, 4, 8:
		default:
			return &fieldError{reason: fmt.Sprintf("integer field of %d bytes", len(v))}
		}
	}
	return nil
}

// splitDigest splits "alg:" NUL digest (or "type:alg:" NUL digest when typed),
// requiring the exact shape the kernel writes so the ascii rendering is
// unambiguous.
func splitDigest(v []byte, typed bool) (typ, alg string, digest []byte, err *fieldError) {
	nul := indexNUL(v)
	if nul < 0 {
		return "", "", nil, &fieldError{reason: "digest field has no NUL after the algorithm"}
	}
	prefix := v[:nul]
	if len(prefix) == 0 || prefix[len(prefix)-1] != ':' {
		return "", "", nil, &fieldError{reason: fmt.Sprintf("digest prefix %q does not end in ':'", prefix)}
	}
	parts := strings.Split(string(prefix[:len(prefix)-1]), ":")
	want := 1
	if typed {
		want = 2
	}
	if len(parts) != want {
		return "", "", nil, &fieldError{reason: fmt.Sprintf("digest prefix %q: want %d ':'-terminated names", prefix, want)}
	}
	for _, p := range parts {
		if !validAlgName(p) {
			return "", "", nil, &fieldError{reason: fmt.Sprintf("digest prefix %q: bad name %q", prefix, p)}
		}
	}
	if typed {
		typ = parts[0]
	}
	return typ, parts[len(parts)-1], v[nul+1:], nil
}

// validAlgName accepts the shape of the kernel's hash_algo_name[] and digest
// type names: lowercase letters, digits and '-'.
func validAlgName(s string) bool {
	if len(s) == 0 || len(s) > maxAlgNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}
