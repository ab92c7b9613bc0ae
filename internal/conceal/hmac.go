package conceal

import (
	"crypto/sha256"
	"encoding"
	"hash"
)

// hmacState is an HMAC-SHA-256 (RFC 2104) whose keyed inner and outer
// states are computed once: each message restores them (SHA-256's
// marshalled state, which is how crypto/hmac resets too) and hashes only
// the message and the inner digest. Messages and digests go through
// buffers inside the state, so a MAC allocates nothing: this runs twice per
// record on the bridge's commit path and per record in the verifier. It is
// not safe for concurrent use.
type hmacState struct {
	inner, outer   hash.Hash
	istate, ostate []byte // marshalled states after the key's ipad and opad blocks
	buf            [maxHMACMsg]byte
	sum            Digest
}

// maxHMACMsg is the longest message a Keys MACs: id || u64(s) || H(R).
const maxHMACMsg = 32 + 8 + 32

func newHMACState(key []byte) *hmacState {
	if len(key) > sha256.BlockSize {
		k := sha256.Sum256(key)
		key = k[:]
	}
	var ipad, opad [sha256.BlockSize]byte
	copy(ipad[:], key)
	copy(opad[:], key)
	for i := range ipad {
		ipad[i] ^= 0x36
		opad[i] ^= 0x5c
	}
	s := &hmacState{inner: sha256.New(), outer: sha256.New()}
	s.inner.Write(ipad[:])
	s.outer.Write(opad[:])
	var err error
	if s.istate, err = s.inner.(encoding.BinaryMarshaler).MarshalBinary(); err != nil {
		panic(err) // crypto/sha256 always marshals its state
	}
	if s.ostate, err = s.outer.(encoding.BinaryMarshaler).MarshalBinary(); err != nil {
		panic(err)
	}
	return s
}

// mac returns HMAC(key, msg); msg is at most maxHMACMsg bytes.
func (s *hmacState) mac(msg []byte) Digest {
	n := copy(s.buf[:], msg)
	if n != len(msg) {
		panic("conceal: HMAC message longer than maxHMACMsg")
	}
	if err := s.inner.(encoding.BinaryUnmarshaler).UnmarshalBinary(s.istate); err != nil {
		panic(err)
	}
	s.inner.Write(s.buf[:n])
	s.inner.Sum(s.sum[:0])
	if err := s.outer.(encoding.BinaryUnmarshaler).UnmarshalBinary(s.ostate); err != nil {
		panic(err)
	}
	s.outer.Write(s.sum[:])
	s.outer.Sum(s.sum[:0])
	return s.sum
}
