// Package canon holds the CBOR modes every tpmmux encoding shares: core
// deterministic encoding (RFC 8949 §4.2.1), so one value has one byte
// string, and a strict decoder (no duplicate keys, indefinite lengths, tags
// or unknown fields, bounded sizes) for bytes from guests, files and the
// network.
package canon

import "github.com/fxamacker/cbor/v2"

// Limits bound what a decoder accepts; they are per format.
type Limits struct {
	Nested int // deepest nesting of arrays and maps
	Array  int // most elements in one array
	Map    int // most pairs in one map
}

// Enc returns the core deterministic encoding mode.
func Enc() cbor.EncMode {
	m, err := cbor.CoreDetEncOptions().EncMode()
	if err != nil {
		panic(err) // the options are constant; this cannot fail
	}
	return m
}

// Dec returns a strict decoding mode with the given limits.
func Dec(l Limits) cbor.DecMode {
	m, err := cbor.DecOptions{
		DupMapKey:         cbor.DupMapKeyEnforcedAPF,
		IndefLength:       cbor.IndefLengthForbidden,
		TagsMd:            cbor.TagsForbidden,
		MaxNestedLevels:   l.Nested,
		MaxArrayElements:  l.Array,
		MaxMapPairs:       l.Map,
		ExtraReturnErrors: cbor.ExtraDecErrorUnknownField,
	}.DecMode()
	if err != nil {
		panic(err) // only out-of-range limits fail: a programming error
	}
	return m
}
