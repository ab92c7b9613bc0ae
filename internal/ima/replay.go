package ima

import (
	"bytes"
	"crypto"
	_ "crypto/sha1"   // register SHA-1 for crypto.Hash.New
	_ "crypto/sha256" // register SHA-224/256
	_ "crypto/sha512" // register SHA-384/512
	"errors"
	"fmt"
)

// ErrHashMismatch reports a template hash column that is not the digest of
// the entry's template data.
var ErrHashMismatch = errors.New("ima: template hash mismatch")

// TemplateDigest returns the template digest the kernel computes for this
// entry in a PCR bank: bank's hash over the template data (the fields with
// their u32 lengths), or, for the legacy "ima" template, over the 20-byte
// digest followed by the event name zero-padded to 256 bytes. For a violation
// it is all zeros, as the kernel logs it. For the SHA-1 bank it equals the
// template hash column of a genuine entry. It returns nil if bank is not
// linked into the binary or the legacy data is malformed.
func (e Entry) TemplateDigest(bank crypto.Hash) []byte {
	if !bank.Available() {
		return nil
	}
	if e.IsViolation() {
		return make([]byte, bank.Size())
	}
	h := bank.New()
	if e.TemplateName == legacyTemplate {
		f, err := decodeLegacy(e.TemplateData)
		if err != nil {
			return nil
		}
		var name [legacyNameField]byte
		copy(name[:], f.Path)
		h.Write(f.Digest)
		h.Write(name[:])
	} else {
		h.Write(e.TemplateData)
	}
	return h.Sum(nil)
}

// ExtendDigest returns the value the kernel extended into the PCR's bank for
// this entry: the template digest, or all 0xFF bytes for a violation (the
// kernel invalidates the PCR rather than extend the zero digest it logs). It
// returns nil where TemplateDigest does.
func (e Entry) ExtendDigest(bank crypto.Hash) []byte {
	if !bank.Available() {
		return nil
	}
	if e.IsViolation() {
		return bytes.Repeat([]byte{0xff}, bank.Size())
	}
	return e.TemplateDigest(bank)
}

// VerifyTemplateHash checks the template hash column against the template
// data, choosing the hash by the column's size (20: SHA-1, 32: SHA-256, 48:
// SHA-384, 64: SHA-512). A violation's all-zero column is accepted. Replay
// recomputes digests from the data, so this check is what ties the column a
// verifier may display to the PCR.
func (e Entry) VerifyTemplateHash() error {
	var h crypto.Hash
	switch len(e.TemplateHash) {
	case 20:
		h = crypto.SHA1
	case 32:
		h = crypto.SHA256
	case 48:
		h = crypto.SHA384
	case 64:
		h = crypto.SHA512
	default:
		return fmt.Errorf("ima: template hash of %d bytes has no known algorithm: %w", len(e.TemplateHash), ErrHashMismatch)
	}
	if e.IsViolation() {
		return nil
	}
	got := e.TemplateDigest(h)
	if got == nil {
		return fmt.Errorf("ima: cannot compute the %v template digest of a %q entry: %w", h, e.TemplateName, ErrInvalid)
	}
	if !bytes.Equal(got, e.TemplateHash) {
		return fmt.Errorf("ima: template hash %x, but the %v of the template data is %x: %w", e.TemplateHash, h, got, ErrHashMismatch)
	}
	return nil
}

// Replay returns the value that the entries for PCR 10 (IMA's default,
// [DefaultPCR]) extend that PCR's bank to, starting from zeros: for each such
// entry, PCR = H(PCR || ExtendDigest(bank)). Comparing it with a quoted PCR
// value is how a verifier knows the list is complete and unmodified. It
// returns nil for a bank not linked into the binary or an entry whose digest
// cannot be computed.
func Replay(entries []Entry, bank crypto.Hash) []byte {
	return ReplayPCR(entries, DefaultPCR, bank)
}

// ReplayPCR is [Replay] for the entries of any PCR (a policy may direct
// measurements to another PCR with pcr=); entries for other PCRs are skipped.
func ReplayPCR(entries []Entry, pcr uint32, bank crypto.Hash) []byte {
	if !bank.Available() {
		return nil
	}
	v := make([]byte, bank.Size())
	h := bank.New()
	for i := range entries {
		if entries[i].PCR != pcr {
			continue
		}
		d := entries[i].ExtendDigest(bank)
		if d == nil {
			return nil
		}
		h.Reset()
		h.Write(v)
		h.Write(d)
		v = h.Sum(v[:0])
	}
	return v
}

// BootAggregate computes the digest IMA logs as its first entry,
// "boot_aggregate", from PCR values of one bank (pcrs[i] is PCR i): the
// bank's hash over PCRs 0-7, and for banks other than SHA-1 also PCRs 8-9.
// The kernel uses the bank of its ima_hash algorithm if the TPM has it and
// SHA-1 otherwise; the d-ng algorithm of the entry names the bank.
func BootAggregate(bank crypto.Hash, pcrs [][]byte) ([]byte, error) {
	if !bank.Available() {
		return nil, fmt.Errorf("ima: boot aggregate: hash %v not available", bank)
	}
	n := 10
	if bank == crypto.SHA1 {
		n = 8
	}
	if len(pcrs) < n {
		return nil, fmt.Errorf("ima: boot aggregate over the %v bank needs PCRs 0-%d, got %d values", bank, n-1, len(pcrs))
	}
	h := bank.New()
	for i := range n {
		if len(pcrs[i]) != bank.Size() {
			return nil, fmt.Errorf("ima: boot aggregate: PCR %d value has %d bytes, the %v bank has %d", i, len(pcrs[i]), bank, bank.Size())
		}
		h.Write(pcrs[i])
	}
	return h.Sum(nil), nil
}
