// Package evidence defines what the bridge hands a verifier about one VM:
// a TPM quote, the PCR values it covers, the public log up to the quoted
// batch, and that VM's records in clear. It has two encodings of one
// structure: canonical CBOR (the binary form, decoded with hard limits) and
// a documented JSON form with hex byte strings (docs/evidence.md).
package evidence

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"

	"github.com/fxamacker/cbor/v2"

	"github.com/tpmmux/tpmmux/internal/canon"
	"github.com/tpmmux/tpmmux/internal/conceal"
)

// Version is the evidence format version this package reads and writes.
const Version = 1

// Kinds of evidence: a fresh quote for a verifier's nonce, or the
// post-mortem quote the bridge kept when the VM's teardown was extended.
const (
	KindQuote = "quote"
	KindFinal = "final"
)

// Limits on decoded evidence, so a hostile file cannot make a verifier
// allocate without bound.
const (
	MaxBytes   = 1 << 30 // whole encoded evidence
	MaxBatches = 1 << 24
	MaxRecords = 1 << 24
	// MaxSegments bounds Previous: a VM's earlier stays on other hosts
	// (live migrations) carried in its evidence.
	MaxSegments = 64
)

// Evidence is the whole evidence for one VM. docs/evidence.md says, field
// by field, what authenticates it.
type Evidence struct {
	Version   uint32      `cbor:"1,keyasint" json:"version"`
	Kind      string      `cbor:"2,keyasint" json:"kind"`
	PCR       uint32      `cbor:"3,keyasint" json:"pcr"`
	Quote     Quote       `cbor:"4,keyasint" json:"quote"`
	PCRValues []PCRValue  `cbor:"5,keyasint" json:"pcr_values"`
	AK        Hex         `cbor:"6,keyasint,omitempty" json:"ak,omitempty"`
	Epoch     Epoch       `cbor:"7,keyasint" json:"epoch"`
	Log       []LogBatch  `cbor:"8,keyasint" json:"log"`
	VM        VM          `cbor:"9,keyasint" json:"vm"`
	Records   []Record    `cbor:"10,keyasint" json:"records"`
	Batched   *QuoteProof `cbor:"11,keyasint,omitempty" json:"batched,omitempty"`
	Host      string      `cbor:"12,keyasint,omitempty" json:"host,omitempty"`
	From      *Since      `cbor:"13,keyasint,omitempty" json:"from,omitempty"`
	// Previous are the VM's earlier segments, oldest first, when it came
	// to this host by live migration (docs/protocol.md "Migration"): each
	// the final (post-mortem) evidence its host kept after the VM's
	// migrated-out record. A flat list: a previous segment has no
	// Previous of its own.
	Previous []Evidence `cbor:"14,keyasint,omitempty" json:"previous,omitempty"`
}

// Segments returns the VM's whole history as the chain of its segments,
// oldest first: the Previous ones and then ev itself (without its
// Previous, so that each segment stands alone).
func (ev *Evidence) Segments() []*Evidence {
	out := make([]*Evidence, 0, len(ev.Previous)+1)
	for i := range ev.Previous {
		out = append(out, &ev.Previous[i])
	}
	last := *ev
	last.Previous = nil
	return append(out, &last)
}

// Chain returns the Previous list of evidence that continues the history
// ev ends (ev is a segment's final evidence, handed to the next host at a
// migration): ev's own Previous, then ev itself without it.
func (ev *Evidence) Chain() []Evidence {
	out := make([]Evidence, 0, len(ev.Previous)+1)
	out = append(out, ev.Previous...)
	last := *ev
	last.Previous = nil
	return append(out, last)
}

// Since marks incremental evidence: Log holds only the batches after batch
// Batch, and Records only the VM's records from number Records on. The
// verifier replays from the checkpoint it kept, not from these values; they
// say which delta this is.
type Since struct {
	Batch   uint64 `cbor:"1,keyasint" json:"batch"`
	Records uint64 `cbor:"2,keyasint" json:"records"`
}

// Quote is a TPM2_Quote in the TPM's wire form.
type Quote struct {
	Attest    Hex `cbor:"1,keyasint" json:"attest"`    // marshalled TPMS_ATTEST
	Signature Hex `cbor:"2,keyasint" json:"signature"` // marshalled TPMT_SIGNATURE
}

// PCRValue is one sha256 PCR value the quote covers.
type PCRValue struct {
	Index  uint32 `cbor:"1,keyasint" json:"index"`
	SHA256 Hex    `cbor:"2,keyasint" json:"sha256"`
}

// Epoch names the epoch the log belongs to. Record is the canonical public
// epoch record, whose leaf is global index 0.
type Epoch struct {
	Number uint64 `cbor:"1,keyasint" json:"number"`
	Record Hex    `cbor:"2,keyasint" json:"record"`
}

// LogBatch is one batch (group commit) of the public log as evidence
// carries it: where it starts and its t||c entries. The batch with G0 = 0
// starts with the epoch record's leaf, so its Entries start at global
// index 1.
type LogBatch struct {
	G0      uint64  `cbor:"1,keyasint" json:"g0"`
	Entries Entries `cbor:"2,keyasint" json:"entries"`
}

// VM names the VM instance the evidence is about.
type VM struct {
	UUID     string `cbor:"1,keyasint" json:"uuid"`
	Instance Hex    `cbor:"2,keyasint" json:"instance"`
	Name     string `cbor:"3,keyasint,omitempty" json:"name,omitempty"`
}

// Record is one of the VM's records in clear with its global index.
// Records are listed in sequence order, starting at s = 0.
type Record struct {
	G uint64 `cbor:"1,keyasint" json:"g"`
	R Hex    `cbor:"2,keyasint" json:"r"`
}

// QuoteProof is present (as Evidence.Batched) when one quote served many
// requests: the quote's extraData is the root of a Merkle tree over their
// H(nonce || id) values, and Path proves this request's leaf is under it.
type QuoteProof struct {
	Index uint64 `cbor:"1,keyasint" json:"index"`
	Count uint64 `cbor:"2,keyasint" json:"count"`
	Path  []Hex  `cbor:"3,keyasint" json:"path"`
}

// Hex is a byte string that JSON renders as lower-case hex.
type Hex []byte

// MarshalJSON renders the bytes as a hex string.
func (h Hex) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(h)) }

// UnmarshalJSON reads a hex string.
func (h *Hex) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(s)
	if err != nil {
		return err
	}
	*h = v
	return nil
}

// Entries is a batch's concatenated t||c entries. CBOR keeps it as one byte
// string; JSON lists one 128-hex-digit string per entry (t then c).
type Entries []byte

// Len returns the number of entries.
func (e Entries) Len() int { return conceal.EntryCount(e) }

// At returns entry i's tag and commitment.
func (e Entries) At(i int) (t, c [32]byte) { return conceal.EntryAt(e, i) }

// MarshalJSON lists the entries as hex strings.
func (e Entries) MarshalJSON() ([]byte, error) {
	if len(e)%conceal.EntrySize != 0 {
		return nil, fmt.Errorf("entries of %d bytes is not a multiple of %d", len(e), conceal.EntrySize)
	}
	var buf bytes.Buffer
	buf.Grow(len(e)*2 + 4*e.Len() + 2)
	buf.WriteByte('[')
	for i := 0; i < e.Len(); i++ {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.WriteByte('"')
		var h [2 * conceal.EntrySize]byte
		hex.Encode(h[:], e[i*conceal.EntrySize:(i+1)*conceal.EntrySize])
		buf.Write(h[:])
		buf.WriteByte('"')
	}
	buf.WriteByte(']')
	return buf.Bytes(), nil
}

// UnmarshalJSON reads the list of hex entries.
func (e *Entries) UnmarshalJSON(b []byte) error {
	var list []string
	if err := json.Unmarshal(b, &list); err != nil {
		return err
	}
	out := make([]byte, 0, len(list)*conceal.EntrySize)
	for i, s := range list {
		if len(s) != 2*conceal.EntrySize {
			return fmt.Errorf("entry %d has %d hex digits, want %d", i, len(s), 2*conceal.EntrySize)
		}
		var v [conceal.EntrySize]byte
		if _, err := hex.Decode(v[:], []byte(s)); err != nil {
			return fmt.Errorf("entry %d: %w", i, err)
		}
		out = append(out, v[:]...)
	}
	*e = out
	return nil
}

// UnmarshalCBOR checks the entry size while decoding.
func (e *Entries) UnmarshalCBOR(b []byte) error {
	var raw []byte
	if err := decMode.Unmarshal(b, &raw); err != nil {
		return err
	}
	if len(raw)%conceal.EntrySize != 0 {
		return fmt.Errorf("entries of %d bytes is not a multiple of %d", len(raw), conceal.EntrySize)
	}
	*e = raw
	return nil
}

var (
	encMode = canon.Enc()
	decMode = canon.Dec(canon.Limits{Nested: 10, Array: MaxBatches, Map: 64})
)

// MarshalCBOR encodes the evidence in its binary form.
func (ev *Evidence) MarshalCBOR() ([]byte, error) {
	type plain Evidence
	return encMode.Marshal((*plain)(ev))
}

// MarshalBinary returns the canonical CBOR form.
func (ev *Evidence) MarshalBinary() ([]byte, error) {
	b, err := ev.MarshalCBOR()
	if err != nil {
		return nil, fmt.Errorf("encode evidence: %w", err)
	}
	return b, nil
}

// Decode reads evidence in either form: JSON when the first non-space byte
// is '{', CBOR otherwise. It enforces the size limits and the version.
func Decode(b []byte) (*Evidence, error) {
	if len(b) > MaxBytes {
		return nil, fmt.Errorf("evidence of %d bytes exceeds the %d-byte limit", len(b), MaxBytes)
	}
	var ev Evidence
	trimmed := bytes.TrimLeft(b, " \t\r\n")
	if len(trimmed) > 0 && trimmed[0] == '{' {
		dec := json.NewDecoder(bytes.NewReader(trimmed))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&ev); err != nil {
			return nil, fmt.Errorf("decode evidence JSON: %w", err)
		}
		if _, err := dec.Token(); err != io.EOF {
			return nil, fmt.Errorf("decode evidence JSON: data after the evidence object (at byte %d)", dec.InputOffset())
		}
	} else {
		type plain Evidence
		if err := decMode.Unmarshal(b, (*plain)(&ev)); err != nil {
			return nil, fmt.Errorf("decode evidence CBOR: %w", err)
		}
	}
	if err := ev.check(); err != nil {
		return nil, err
	}
	if len(ev.Previous) > MaxSegments {
		return nil, fmt.Errorf("evidence has %d previous segments, limit %d", len(ev.Previous), MaxSegments)
	}
	for i := range ev.Previous {
		p := &ev.Previous[i]
		if len(p.Previous) > 0 {
			return nil, fmt.Errorf("previous segment %d has previous segments of its own: the chain is a flat list, oldest first", i)
		}
		if err := p.check(); err != nil {
			return nil, fmt.Errorf("previous segment %d: %w", i, err)
		}
	}
	return &ev, nil
}

// DecodeChain decodes a Previous list as EncodeChain wrote it, with
// Decode's limits.
func DecodeChain(b []byte) ([]Evidence, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if len(b) > MaxBytes {
		return nil, fmt.Errorf("evidence chain of %d bytes exceeds the %d-byte limit", len(b), MaxBytes)
	}
	// A chain is decoded as the Previous of an otherwise empty evidence,
	// so it gets the very same checks.
	wrapped, err := encMode.Marshal(struct {
		V uint32          `cbor:"1,keyasint"`
		P cbor.RawMessage `cbor:"14,keyasint"`
	}{Version, b})
	if err != nil {
		return nil, fmt.Errorf("decode evidence chain: %w", err)
	}
	ev, err := Decode(wrapped)
	if err != nil {
		return nil, fmt.Errorf("decode evidence chain: %w", err)
	}
	return ev.Previous, nil
}

// EncodeChain encodes a Previous list (canonical CBOR) for storage.
func EncodeChain(chain []Evidence) ([]byte, error) {
	if len(chain) == 0 {
		return nil, nil
	}
	type plain Evidence
	list := make([]*plain, len(chain))
	for i := range chain {
		list[i] = (*plain)(&chain[i])
	}
	b, err := encMode.Marshal(list)
	if err != nil {
		return nil, fmt.Errorf("encode evidence chain: %w", err)
	}
	return b, nil
}

// check enforces the version and the record limit of one segment.
func (ev *Evidence) check() error {
	if ev.Version != Version {
		return fmt.Errorf("evidence version %d, this verifier reads version %d", ev.Version, Version)
	}
	if len(ev.Records) > MaxRecords {
		return fmt.Errorf("evidence holds %d records, limit %d", len(ev.Records), MaxRecords)
	}
	return nil
}
