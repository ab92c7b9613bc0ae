// Package ima parses, encodes, builds and replays Linux IMA measurement lists.
//
// The input is the kernel's binary measurement list
// (/sys/kernel/security/ima/binary_runtime_measurements). Each entry is, in
// the kernel's native byte order (little-endian on every platform tpmmux runs
// on, and always little-endian under ima_canonical_fmt):
//
//	u32  PCR index
//	[20] template hash (SHA-1 of the template data; the "template-hash" column)
//	u32  template name length, then the template name (no NUL)
//	u32  template data length, then the template data   (absent for "ima")
//
// For every template except the legacy "ima" one, the template data is a
// sequence of fields, each a u32 length followed by that many bytes, and the
// template hash of a bank is that bank's hash over exactly those bytes. The
// legacy "ima" template is different on the wire and in its hash: its data has
// no overall length, the digest ("d") has no length prefix, the name ("n") is
// written without its NUL, and the hash covers the digest followed by the name
// zero-padded to 256 bytes (IMA_EVENT_NAME_LEN_MAX+1). See
// [Entry.TemplateDigest].
//
// The package never trusts its input: every length is bounded (see
// [MaxTemplateNameLen] and [MaxTemplateDataLen]), malformed input is reported
// as a [*ParseError] that names the entry index and byte offset, and no input
// makes it panic. An incomplete trailing entry is reported as [ErrTruncated],
// distinct from a malformed one ([ErrInvalid]) or an over-limit one
// ([ErrTooLarge]), so a reader of a growing list can tell "wait for more" from
// "this list is broken".
package ima

import (
	"bytes"
	"errors"
	"fmt"
)

// Limits and well-known values of the IMA binary format.
const (
	// DefaultPCR is the PCR IMA extends unless a policy rule says otherwise
	// (CONFIG_IMA_MEASURE_PCR_IDX); [Replay] folds the entries for this PCR.
	DefaultPCR = 10

	// MaxPCR is one more than the highest PCR index the kernel accepts in a
	// policy rule (it keeps measured PCRs in a 64-bit mask); entries naming a
	// PCR at or above it cannot come from a kernel and are rejected.
	MaxPCR = 64

	// SHA1Size is the size of the template hash column in
	// binary_runtime_measurements (TPM_DIGEST_SIZE, a SHA-1 digest).
	SHA1Size = 20

	// MaxTemplateNameLen bounds the template name. Real names are a builtin
	// name ("ima-sig") or a format string of at most 15 field ids
	// ("d-ng|n-ng|sig"), far shorter.
	MaxTemplateNameLen = 255

	// MaxEventNameLen bounds the name of a legacy "ima" entry: the kernel
	// truncates it to IMA_EVENT_NAME_LEN_MAX (255) bytes and hashes it in a
	// zero-padded field of 255+1 = 256 bytes.
	MaxEventNameLen = 255

	// MaxTemplateDataLen bounds the template data of one entry (2 MiB). It is
	// well above what a kernel writes: an ima-sig entry is at most a path
	// (PATH_MAX, 4 KiB) plus a security.ima signature (XATTR_SIZE_MAX, 64 KiB),
	// so 64 KiB would be too small; the largest legitimate entries are ima-buf
	// entries of the KEY_CHECK hook, which carry a key payload of up to
	// 1 MiB - 1 (the add_key(2) limit), and evm-sig entries, which carry
	// several xattrs of up to 64 KiB each. The cap keeps a hostile or corrupt
	// length from making a reader allocate without bound.
	MaxTemplateDataLen = 2 << 20

	// MaxTemplateHashSize bounds the template hash column (SHA-512's size).
	MaxTemplateHashSize = 64
)

// Sentinel errors, wrapped by [*ParseError] and by encoding errors; test them
// with errors.Is.
var (
	// ErrTruncated reports input that ends inside an entry: the bytes seen so
	// far are a valid prefix, and more data may complete the entry.
	ErrTruncated = errors.New("ima: truncated entry")

	// ErrTooLarge reports a length field above one of the package limits.
	ErrTooLarge = errors.New("ima: length over limit")

	// ErrInvalid reports bytes that no kernel writes: a malformed header or
	// template field.
	ErrInvalid = errors.New("ima: malformed entry")
)

// ParseError describes why an entry of a binary measurement list could not be
// decoded, and where: callers that re-read a growing list need the entry index
// and byte offsets to resume or to report the fault precisely.
type ParseError struct {
	// Index is the 0-based position of the entry in the list.
	Index int
	// Offset is the byte offset of the entry's first byte in the list.
	Offset int64
	// At is the byte offset at which the problem was detected.
	At int64
	// Reason says what is wrong, in words.
	Reason string
	// Err is ErrTruncated, ErrTooLarge or ErrInvalid.
	Err error
}

// Error formats the entry index, the offsets and the reason.
func (e *ParseError) Error() string {
	return fmt.Sprintf("ima: entry %d at offset %d: byte %d: %s", e.Index, e.Offset, e.At, e.Reason)
}

// Unwrap returns the sentinel (ErrTruncated, ErrTooLarge or ErrInvalid) so
// errors.Is works.
func (e *ParseError) Unwrap() error { return e.Err }

// Entry is one measurement of the list: the header columns and the template
// data exactly as the kernel logged them, plus a decoded view of the data.
//
// TemplateData is authoritative: [Entry.MarshalBinary], [Entry.ASCII] and
// [Entry.TemplateDigest] work from it, and Fields only mirrors it for
// convenience. For every template but "ima" it is the data as the kernel
// stores and hashes it (each field as u32 length + bytes). For the legacy
// "ima" template it is the bytes as they appear in the binary list: the
// 20-byte digest, a u32 name length and the name without NUL.
type Entry struct {
	// PCR is the PCR the kernel extended with this entry (10 by default).
	PCR uint32
	// TemplateHash is the template-hash column: the SHA-1 digest of the
	// template data in binary_runtime_measurements, or all zeros for a
	// violation (see [Entry.IsViolation]).
	TemplateHash []byte
	// TemplateName is the template's name ("ima-sig") or, for a custom
	// template, its format string ("d-ng|n-ng").
	TemplateName string
	// TemplateData is the template data; see the type documentation.
	TemplateData []byte
	// Fields is the decoded template data. It is empty for an unknown
	// template. Its byte slices alias TemplateData.
	Fields Fields
}

// Fields is the decoded template data of an entry: the values of the
// well-known fields, and every field in order in Raw. Values absent from the
// template (or empty in the entry, like the sig of an unsigned file) are zero.
type Fields struct {
	// DigestType is "ima" or "verity" for a d-ngv2 digest, else empty.
	DigestType string
	// DigestAlg is the kernel's name of the file digest's algorithm
	// ("sha256"), from a d-ng or d-ngv2 field; "sha1" (or "md5") for a
	// legacy d field.
	DigestAlg string
	// Digest is the file (or buffer) digest. For a violation it is all zeros.
	Digest []byte
	// Path is the event name: a file path for file measurements, or a name
	// such as "boot_aggregate" or "kexec-cmdline". The kernel writes spaces
	// as underscores.
	Path string
	// Sig is the security.ima signature (sig field), empty when unsigned.
	Sig []byte
	// Buf is the measured buffer of an ima-buf entry.
	Buf []byte
	// ModsigDigestAlg and ModsigDigest are the d-modsig field: the digest the
	// file's appended signature covers. Empty without an appended signature.
	ModsigDigestAlg string
	// ModsigDigest is the digest part of the d-modsig field.
	ModsigDigest []byte
	// Modsig is the appended signature (modsig field), if any.
	Modsig []byte
	// Raw lists every field of the template in order with its bytes (without
	// the u32 length prefix; for the legacy "n" field, without the NUL).
	Raw []Field
}

// Field is one template field: its id (as in a template format string, e.g.
// "d-ng") and its bytes as stored, without the u32 length prefix.
type Field struct {
	// ID is the field id, such as "d-ng", "n-ng" or "sig".
	ID string
	// Data is the field's bytes; for strings, including the NUL.
	Data []byte
}

// IsViolation reports whether the entry records a violation (ToMToU or
// open-writers): the kernel logs an all-zero template hash for it and extends
// the PCR with all-0xFF bytes instead.
func (e Entry) IsViolation() bool {
	if len(e.TemplateHash) == 0 {
		return false
	}
	for _, b := range e.TemplateHash {
		if b != 0 {
			return false
		}
	}
	return true
}

// IsSigned reports whether the entry carries a non-empty sig field (a
// security.ima signature or EVM portable signature), as ima-sig entries of
// signed files do.
func (e Entry) IsSigned() bool { return len(e.Fields.Sig) > 0 }

// BinarySize returns the number of bytes the entry occupies in the binary
// list, so callers can track offsets into a growing file.
func (e Entry) BinarySize() int {
	n := 4 + len(e.TemplateHash) + 4 + len(e.TemplateName) + len(e.TemplateData)
	if e.TemplateName != legacyTemplate {
		n += 4
	}
	return n
}

// Equal reports whether two entries have the same header and template data
// (Fields is derived from TemplateData and not compared).
func (e Entry) Equal(o Entry) bool {
	return e.PCR == o.PCR && e.TemplateName == o.TemplateName &&
		bytes.Equal(e.TemplateHash, o.TemplateHash) && bytes.Equal(e.TemplateData, o.TemplateData)
}
