package verify

import (
	"bytes"
	"crypto/sha1"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// imaFallback reports whether d is what a guest kernel's IMA extends into
// a PCR bank whose hash it cannot compute (its kernel lacks that hash, as
// Debian's 6.1 lacks sha384 and sha512 while IMA initializes): the SHA-1
// of the template data, zero-padded to the bank's size, or, on kernels
// built without CONFIG_IMA_COMPAT_FALLBACK_TPM_EXTEND, 20 bytes of 0xfe
// zero-padded. Only sha384 and sha512 may hold it: a vTPM's sha1 and
// sha256 banks must hold their own hash, so pairing stays as strong as
// the sha256 bank wherever the vTPM has one.
func imaFallback(d vpcr.Digest, templateData []byte) bool {
	if d.Alg != vpcr.SHA384 && d.Alg != vpcr.SHA512 {
		return false
	}
	s1 := sha1.Sum(templateData)
	padded := func(p []byte) []byte { return append(append([]byte{}, p...), make([]byte, d.Alg.Size()-len(p))...) }
	return bytes.Equal(d.Value, padded(s1[:])) || bytes.Equal(d.Value, padded(bytes.Repeat([]byte{0xfe}, sha1.Size)))
}
