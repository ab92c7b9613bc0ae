package ima

import (
	"crypto"
	"crypto/sha1"
	"encoding/binary"
	"strings"
)

// NewIMANG builds an ima-ng entry for a file as a kernel would log it: the
// template data holds the d-ng field ("alg:" NUL digest) and the n-ng field
// (the path, NUL-terminated), and the template hash is the SHA-1 of that data,
// as the template-hash column of binary_runtime_measurements holds it. It lets
// tests and the demo make real-format entries from digests of real files.
//
// alg must be a kernel hash algorithm name such as "sha256" (see [AlgName]),
// and fileDigest the file's digest under it. Like the kernel, the builder
// treats alg and path as C strings (they end at a NUL) and writes spaces in
// the path as underscores.
func NewIMANG(pcr uint32, alg string, fileDigest []byte, path string) Entry {
	return newNG("ima-ng", pcr, alg, fileDigest, path, nil)
}

// NewIMASig builds an ima-sig entry: an ima-ng entry (see [NewIMANG]) with a
// third field holding sig, the file's security.ima signature (empty for an
// unsigned file, as the kernel logs it).
func NewIMASig(pcr uint32, alg string, fileDigest []byte, path string, sig []byte) Entry {
	if sig == nil {
		sig = []byte{}
	}
	return newNG("ima-sig", pcr, alg, fileDigest, path, sig)
}

// newNG assembles d-ng|n-ng[|sig] template data; sig == nil omits the field.
func newNG(name string, pcr uint32, alg string, digest []byte, path string, sig []byte) Entry {
	alg = cString(alg)
	path = strings.ReplaceAll(cString(path), " ", "_")
	dngLen := len(alg) + 2 + len(digest)
	nngLen := len(path) + 1
	size := 4 + dngLen + 4 + nngLen
	if sig != nil {
		size += 4 + len(sig)
	}
	data := make([]byte, 0, size)
	data = binary.LittleEndian.AppendUint32(data, uint32(dngLen))
	data = append(data, alg...)
	data = append(data, ':', 0)
	data = append(data, digest...)
	data = binary.LittleEndian.AppendUint32(data, uint32(nngLen))
	data = append(data, path...)
	data = append(data, 0)
	if sig != nil {
		data = binary.LittleEndian.AppendUint32(data, uint32(len(sig)))
		data = append(data, sig...)
	}
	sum := sha1.Sum(data)

	dng := data[4 : 4+dngLen]
	nng := data[4+dngLen+4 : 4+dngLen+4+nngLen]
	f := Fields{
		DigestAlg: alg,
		Digest:    dng[len(alg)+2:],
		Path:      path,
		Raw:       []Field{{ID: "d-ng", Data: dng}, {ID: "n-ng", Data: nng}},
	}
	if sig != nil {
		s := data[len(data)-len(sig):]
		if len(s) > 0 {
			f.Sig = s
		}
		f.Raw = append(f.Raw, Field{ID: "sig", Data: s})
	}
	return Entry{PCR: pcr, TemplateHash: sum[:], TemplateName: name, TemplateData: data, Fields: f}
}

// cString returns s up to its first NUL, as C code would see it.
func cString(s string) string {
	if i := strings.IndexByte(s, 0); i >= 0 {
		return s[:i]
	}
	return s
}

// AlgName returns the kernel's name (hash_algo_name[]) of a hash, as d-ng
// fields spell it ("sha256"), or "" for a hash IMA does not name.
func AlgName(h crypto.Hash) string {
	switch h {
	case crypto.MD5:
		return "md5"
	case crypto.SHA1:
		return "sha1"
	case crypto.SHA224:
		return "sha224"
	case crypto.SHA256:
		return "sha256"
	case crypto.SHA384:
		return "sha384"
	case crypto.SHA512:
		return "sha512"
	case crypto.SHA3_256:
		return "sha3-256"
	case crypto.SHA3_384:
		return "sha3-384"
	case crypto.SHA3_512:
		return "sha3-512"
	}
	return ""
}

// AlgHash is the inverse of [AlgName]: the crypto.Hash of a kernel hash name,
// or 0 for a name it does not map (such as "sm3" or "streebog256"), so a
// verifier can recompute or size-check a logged file digest.
func AlgHash(name string) crypto.Hash {
	for _, h := range []crypto.Hash{crypto.MD5, crypto.SHA1, crypto.SHA224, crypto.SHA256,
		crypto.SHA384, crypto.SHA512, crypto.SHA3_256, crypto.SHA3_384, crypto.SHA3_512} {
		if AlgName(h) == name {
			return h
		}
	}
	return 0
}
