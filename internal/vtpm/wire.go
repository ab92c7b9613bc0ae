package vtpm

import "encoding/binary"

// TPM 2.0 constants (TPM 2.0 Library, Part 2), only those the vTPM uses.
const (
	stNoSessions uint16 = 0x8001
	stSessions   uint16 = 0x8002
	// A TPM 1.2 request tag. The vTPM answers it with a TPM 2.0 header
	// and TPM_RC_BAD_TAG, as swtpm (libtpms) does, not in 1.2 form (tag
	// 0x00C4, which Part 1 "Compatibility" allows): OVMF probes a TIS
	// TPM with a 1.2 GetTicks and takes any 0x00C4 answer for a TPM 1.2,
	// and then does no TPM 2.0 measured boot at all.
	tpm12TagRquCommand uint16 = 0x00C1

	headerSize = 10
)

// Command codes.
const (
	ccHierarchyControl    uint32 = 0x121
	ccHierarchyChangeAuth uint32 = 0x129
	ccPCRAllocate         uint32 = 0x12B
	ccPCREvent            uint32 = 0x13C
	ccPCRReset            uint32 = 0x13D
	ccIncrementalSelfTest uint32 = 0x142
	ccSelfTest            uint32 = 0x143
	ccStartup             uint32 = 0x144
	ccShutdown            uint32 = 0x145
	ccStirRandom          uint32 = 0x146
	ccGetCapability       uint32 = 0x17A
	ccGetRandom           uint32 = 0x17B
	ccGetTestResult       uint32 = 0x17C
	ccPCRRead             uint32 = 0x17E
	ccReadClock           uint32 = 0x181
	ccPCRExtend           uint32 = 0x182
)

// Response codes.
const (
	rcSuccess     uint32 = 0x000
	rcBadTag      uint32 = 0x01E
	rcInitialize  uint32 = 0x100
	rcFailure     uint32 = 0x101
	rcLocality    uint32 = 0x907 // a warning (RC_WARN+7)
	rcCommandCode uint32 = 0x143
	rcCommandSize uint32 = 0x142
	rcAuthContext uint32 = 0x145
	rcAuthMissing uint32 = 0x125
	rcAuthsize    uint32 = 0x144
	rcPCR         uint32 = 0x127
	rcRetry       uint32 = 0x922
	rcReferenceS0 uint32 = 0x910

	// Format-1 errors; or with rcP|rcN(n) (parameter n), rcH (handle n) or
	// rcS (session n).
	rcFmt1         uint32 = 0x080
	rcAsymmetric   uint32 = rcFmt1 + 0x001
	rcValue        uint32 = rcFmt1 + 0x004
	rcHierarchy    uint32 = rcFmt1 + 0x005
	rcHandle       uint32 = rcFmt1 + 0x00B
	rcAuthFail     uint32 = rcFmt1 + 0x00E
	rcSize         uint32 = rcFmt1 + 0x015
	rcNonce        uint32 = rcFmt1 + 0x00F
	rcHash         uint32 = rcFmt1 + 0x003
	rcAttributes   uint32 = rcFmt1 + 0x002
	rcAuthType     uint32 = rcFmt1 + 0x024
	rcInsufficient uint32 = rcFmt1 + 0x01A

	rcP uint32 = 0x040
	rcS uint32 = 0x800
)

// rcParam is a format-1 rc for parameter n (1-based).
func rcParam(rc uint32, n int) uint32 { return rc | rcP | uint32(n&0xF)<<8 }

// rcHandleN is a format-1 rc for handle n (1-based).
func rcHandleN(rc uint32, n int) uint32 { return rc | uint32(n&0x7)<<8 }

// rcSession is a format-1 rc for session n (1-based).
func rcSession(rc uint32, n int) uint32 { return rc | rcS | uint32(n&0x7)<<8 }

// Handles.
const (
	rhOwner       uint32 = 0x40000001
	rhNull        uint32 = 0x40000007
	rsPW          uint32 = 0x40000009
	rhLockout     uint32 = 0x4000000A
	rhEndorsement uint32 = 0x4000000B
	rhPlatform    uint32 = 0x4000000C
	rhPlatformNV  uint32 = 0x4000000D
)

// Startup and shutdown types.
const (
	suClear uint16 = 0
	suState uint16 = 1
)

// reader decodes big-endian TPM structures from untrusted bytes. The first
// decoding failure sticks: every later read returns zero values and ok()
// reports false, so handlers check once at the end of a structure.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n < 0 || n > len(r.b) {
		r.bad = true
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

// tpm2b reads a u16-sized buffer of at most max bytes; a larger size is a
// decoding failure reported as tooBig.
func (r *reader) tpm2b(max int) (b []byte, tooBig bool) {
	n := int(r.u16())
	if r.bad {
		return nil, false
	}
	if n > max {
		r.bad = true
		return nil, true
	}
	return r.take(n), false
}

func (r *reader) ok() bool    { return !r.bad }
func (r *reader) empty() bool { return len(r.b) == 0 }

// writer builds a response.
type writer struct{ b []byte }

func (w *writer) u8(v uint8)   { w.b = append(w.b, v) }
func (w *writer) u16(v uint16) { w.b = binary.BigEndian.AppendUint16(w.b, v) }
func (w *writer) u32(v uint32) { w.b = binary.BigEndian.AppendUint32(w.b, v) }
func (w *writer) u64(v uint64) { w.b = binary.BigEndian.AppendUint64(w.b, v) }
func (w *writer) bytes(v []byte) {
	w.b = append(w.b, v...)
}
func (w *writer) tpm2b(v []byte) {
	w.u16(uint16(len(v)))
	w.b = append(w.b, v...)
}

// errorResponse is the 10-byte response carrying rc.
func errorResponse(rc uint32) []byte {
	var w writer
	w.u16(stNoSessions)
	w.u32(headerSize)
	w.u32(rc)
	return w.b
}
