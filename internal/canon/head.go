package canon

import "encoding/binary"

// AppendHead appends a CBOR head of major type major (0-7) and argument v
// in its shortest form (RFC 8949 §4.2.1), as Enc writes it: encoders that
// write parts of a canonical value by hand (a map's head, a byte string's
// length before bytes sent separately) produce the same bytes as Enc.
func AppendHead(b []byte, major byte, v uint64) []byte {
	mt := major << 5
	switch {
	case v < 24:
		return append(b, mt|byte(v))
	case v <= 0xff:
		return append(b, mt|24, byte(v))
	case v <= 0xffff:
		return binary.BigEndian.AppendUint16(append(b, mt|25), uint16(v))
	case v <= 0xffffffff:
		return binary.BigEndian.AppendUint32(append(b, mt|26), uint32(v))
	}
	return binary.BigEndian.AppendUint64(append(b, mt|27), v)
}
