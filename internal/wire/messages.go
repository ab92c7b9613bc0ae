package wire

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/fxamacker/cbor/v2"

	"github.com/tpmmux/tpmmux/internal/canon"
)

// PreferredPayload is the payload size a sender should keep measurement
// frames under, so that a resynchronizing reader can hold a whole frame in
// its buffer and a torn frame never swallows the next one.
const PreferredPayload = 60 << 10

// Hello opens a session (agent to bridge). The bridge identifies the VM by
// the transport, never by anything in Hello.
type Hello struct {
	Proto        uint32 `cbor:"1,keyasint"`
	AgentVersion string `cbor:"2,keyasint,omitempty"`
	BootID       string `cbor:"3,keyasint"`           // /proc/sys/kernel/random/boot_id
	Have         uint64 `cbor:"4,keyasint,omitempty"` // entries the agent can see (informational)
}

// Welcome answers Hello: where to resume.
type Welcome struct {
	VM         string `cbor:"1,keyasint"`
	Resume     uint64 `cbor:"2,keyasint"` // the next IMA log index the bridge needs for this boot
	MaxEntries uint32 `cbor:"3,keyasint"`
	MaxPayload uint32 `cbor:"4,keyasint"`
	Window     uint32 `cbor:"5,keyasint"` // measurement frames the agent may have unacknowledged
}

// Entry is one guest IMA log entry as the agent read it.
type Entry struct {
	PCR          uint32 `cbor:"1,keyasint"`
	HashAlg      string `cbor:"2,keyasint"` // algorithm of TemplateHash: "sha1" or "sha256"
	TemplateHash []byte `cbor:"3,keyasint"`
	Template     string `cbor:"4,keyasint"`
	Data         []byte `cbor:"5,keyasint"`
}

// Measurements carries consecutive IMA entries starting at log index First.
type Measurements struct {
	Seq     uint64  `cbor:"1,keyasint"` // the agent's frame number, echoed in the Ack
	First   uint64  `cbor:"2,keyasint"`
	Entries []Entry `cbor:"3,keyasint"`
}

// Ack says that every entry before Next is durable and extended.
type Ack struct {
	Seq  uint64 `cbor:"1,keyasint"`
	Next uint64 `cbor:"2,keyasint"`
}

// Error reports a refused message. Fatal errors end the session.
type Error struct {
	Code    string `cbor:"1,keyasint"`
	Message string `cbor:"2,keyasint"`
	Fatal   bool   `cbor:"3,keyasint,omitempty"`
	Seq     uint64 `cbor:"4,keyasint,omitempty"`
}

func (e *Error) Error() string { return fmt.Sprintf("bridge: %s: %s", e.Code, e.Message) }

// Error codes.
const (
	CodeProtocol    = "protocol"    // malformed or unexpected message
	CodeGap         = "gap"         // entries do not start where the bridge resumes
	CodeUnavailable = "unavailable" // the bridge cannot acknowledge now (faulted TPM or store)
	CodeEnded       = "ended"       // the VM instance has ended
	CodeTooMany     = "too-many"    // limits exceeded
	CodeBadEntry    = "bad-entry"   // an entry failed validation
	CodeEvidence    = "evidence"    // evidence could not be produced
	CodeQuota       = "quota"       // over a per-VM quota: slowed (not fatal) or refused (fatal)
	// CodeHello (not fatal): the bridge holds no session on this stream
	// (it restarted, or the VM migrated here) and skips frames until a
	// hello. On virtio-serial the guest cannot see the host end change,
	// so without it an agent would notice only at its ping timeout.
	CodeHello = "hello"
)

// EvidenceRequest asks for this VM's evidence for Nonce: full evidence, or,
// with Since, only what follows a verifier's checkpoint (the batches after
// Since.Batch and the VM's records from Since.Records on; docs/protocol.md,
// incremental verification).
//
// With Early the requester takes the evidence's end first: the bridge may
// send the log and the VM's fields while the TPM takes the quote, in parts
// with EvidenceResponse.Early set, and the quote's fields after it (see
// Assembler; docs/protocol.md, Early evidence). A bridge that does not
// know the field answers as without it.
type EvidenceRequest struct {
	ID    uint64 `cbor:"1,keyasint"`
	Nonce []byte `cbor:"2,keyasint"`
	Since *Since `cbor:"3,keyasint,omitempty"`
	Early bool   `cbor:"4,keyasint,omitempty"`
}

// Since is a verifier checkpoint's position (verify.Checkpoint.Since).
type Since struct {
	Batch   uint64 `cbor:"1,keyasint"`
	Records uint64 `cbor:"2,keyasint"`
}

// EvidenceResponse carries the evidence (binary form), the VM's own
// identity (uuid, instance, key: the VM may hold its key) and the AK.
// Evidence larger than EvidenceChunk travels in several responses of the
// same ID (parts 0, 1, …; all but the last have More set; the first
// carries the identity and AK, and the Total size when the sender knows
// it): see EvidenceParts and Assembler. Parts with Early set (only in
// answer to a request with Early) come first and carry the evidence's END:
// the evidence is the bytes of the later parts followed by those of the
// early ones.
type EvidenceResponse struct {
	ID       uint64   `cbor:"1,keyasint"`
	Evidence []byte   `cbor:"2,keyasint"`
	UUID     [16]byte `cbor:"3,keyasint"`
	Instance [16]byte `cbor:"4,keyasint"`
	Key      [32]byte `cbor:"5,keyasint"`
	AKPEM    []byte   `cbor:"6,keyasint"`
	Part     uint32   `cbor:"7,keyasint,omitempty"`
	More     bool     `cbor:"8,keyasint,omitempty"`
	Total    uint64   `cbor:"9,keyasint,omitempty"`
	Early    bool     `cbor:"10,keyasint,omitempty"`
}

// Bind asks the bridge to bind a guest public key hash to this VM.
type Bind struct {
	Seq     uint64   `cbor:"1,keyasint"`
	Purpose string   `cbor:"2,keyasint"`
	KeyHash [32]byte `cbor:"3,keyasint"`
}

// Ping keeps a session alive; the peer answers with a Pong of the same Seq.
type Ping struct {
	Seq uint64 `cbor:"1,keyasint"`
}

// Pong answers a Ping.
type Pong struct {
	Seq uint64 `cbor:"1,keyasint"`
}

var (
	encMode = canon.Enc()
	decMode = canon.Dec(canon.Limits{Nested: 6, Array: MaxEntries, Map: 16})
)

// bufEnc is encMode encoding into a caller's buffer.
var bufEnc = encMode.(cbor.UserBufferEncMode)

// sizeHinter is a message that knows about how large its encoding is.
type sizeHinter interface{ sizeHint() int }

// sizeHint bounds the encoding of the fields other than the evidence and
// the AK's PEM from above (fixed-size fields and CBOR heads).
func (m *EvidenceResponse) sizeHint() int { return len(m.Evidence) + len(m.AKPEM) + 192 }

// Encode returns the frame for message m. The payload is encoded in place,
// in one buffer of the frame's size when m knows its size (an evidence
// response): a bridge answering a thousand verifiers per quote otherwise
// allocated and copied each response's evidence twice more.
func Encode(t Type, m any) ([]byte, error) {
	hint := 64
	if h, ok := m.(sizeHinter); ok {
		hint = h.sizeHint()
	}
	buf := bytes.NewBuffer(make([]byte, HeaderSize, HeaderSize+hint+TrailerLen))
	if err := bufEnc.MarshalToBuffer(m, buf); err != nil {
		return nil, fmt.Errorf("encode %s: %w", t, err)
	}
	b := buf.Bytes()
	payload := b[HeaderSize:]
	if len(payload) > MaxPayload {
		return nil, fmt.Errorf("encode %s frame: %d bytes: %w", t, len(payload), ErrTooLarge)
	}
	h := frameHeader(t, len(payload))
	copy(b, h[:])
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(payload, castagnoli)), nil
}

// Decode decodes a frame's payload into m, which must be the message type
// the frame's type names.
func Decode(f Frame, m any) error {
	if want := typeOf(m); want != f.Type {
		return fmt.Errorf("decode: got a %s frame, want %s", f.Type, want)
	}
	if err := decMode.Unmarshal(f.Payload, m); err != nil {
		return fmt.Errorf("decode %s: %w", f.Type, err)
	}
	return nil
}

func typeOf(m any) Type {
	switch m.(type) {
	case *Hello:
		return TypeHello
	case *Welcome:
		return TypeWelcome
	case *Measurements:
		return TypeMeasurements
	case *Ack:
		return TypeAck
	case *Error:
		return TypeError
	case *EvidenceRequest:
		return TypeEvidenceRequest
	case *EvidenceResponse:
		return TypeEvidenceResponse
	case *Bind:
		return TypeBind
	case *Ping:
		return TypePing
	case *Pong:
		return TypePong
	}
	return 0
}

// Conn sends and receives messages on one stream. Sends are not
// synchronized: one goroutine sends.
type Conn struct {
	r *Reader
	w interface{ Write([]byte) (int, error) }
}

// NewConn wraps a stream. resync as for NewReader.
func NewConn(rw interface {
	Read([]byte) (int, error)
	Write([]byte) (int, error)
}, resync bool) *Conn {
	return &Conn{r: NewReader(rw, resync), w: rw}
}

// Send writes one message.
func (c *Conn) Send(t Type, m any) error {
	b, err := Encode(t, m)
	if err != nil {
		return err
	}
	if _, err := c.w.Write(b); err != nil {
		return fmt.Errorf("send %s: %w", t, err)
	}
	return nil
}

// Recv reads the next frame.
func (c *Conn) Recv() (Frame, error) { return c.r.Next() }

// Reader returns the frame reader (for its counters).
func (c *Conn) Reader() *Reader { return c.r }
