package conceal

import (
	"crypto/hmac"
	"crypto/sha256"
	"hash"
)

// hmacState is an HMAC-SHA-256 whose keyed inner and outer states are kept
// between messages: hmac.Reset restores them without re-deriving the pads.
// It is not safe for concurrent use.
type hmacState struct {
	h hash.Hash
}

func newHMACState(key []byte) hmacState {
	return hmacState{h: hmac.New(sha256.New, key)}
}

func (s hmacState) mac(msg []byte) Digest {
	s.h.Reset()
	s.h.Write(msg)
	var d Digest
	s.h.Sum(d[:0])
	return d
}
