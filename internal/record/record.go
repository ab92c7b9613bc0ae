// Package record defines the per-VM records of protocol v1 (genesis,
// measurement, reboot, binding, teardown, action, tpm, migrated-out,
// migrated-in) and the public epoch record, with
// their canonical encoding R: deterministic CBOR (RFC 8949 §4.2.1) with small
// integer map keys. The canonical bytes are what the concealed commitment
// c_s covers, so decoding refuses any input that does not re-encode to the
// very same bytes.
package record

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/canon"
)

// MaxSize bounds the canonical encoding of one record. IMA template data is
// normally small, but an ima-sig entry can carry a 64 KiB signature and a
// KEY_CHECK ima-buf entry up to about 1 MiB (ima.MaxTemplateDataLen is 2 MiB);
// the bound keeps a hostile guest or evidence file from making the decoder
// allocate much.
const MaxSize = 4 << 20

// Kind says what a record records.
type Kind uint8

// The record kinds of protocol v1.
const (
	KindGenesis     Kind = 1 // record 0: the VM instance's launch
	KindMeasurement Kind = 2 // one guest IMA log entry
	KindReboot      Kind = 3 // the host saw the guest reset
	KindBinding     Kind = 4 // a guest key bound to this VM (relay-attack countermeasure)
	KindTeardown    Kind = 5 // the last record: the VM instance ended
	KindAction      Kind = 6 // an enforcement action the bridge took on this VM
	KindTPM         Kind = 7 // an event of the VM's bridge-served vTPM (vTPM mode)
	KindMigratedOut Kind = 8 // the last record of a segment: the VM left for another host
	KindMigratedIn  Kind = 9 // the first record of a segment: the VM arrived from another host
)

// String names the kind as docs/protocol.md and the verifier's report do.
func (k Kind) String() string {
	switch k {
	case KindGenesis:
		return "genesis"
	case KindMeasurement:
		return "measurement"
	case KindReboot:
		return "reboot"
	case KindBinding:
		return "binding"
	case KindTeardown:
		return "teardown"
	case KindAction:
		return "action"
	case KindTPM:
		return "tpm"
	case KindMigratedOut:
		return "migrated-out"
	case KindMigratedIn:
		return "migrated-in"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Record is one entry of a VM's history. Exactly one body, the one Kind
// names, is set.
type Record struct {
	Kind        Kind         `cbor:"1,keyasint" json:"kind"`
	Time        int64        `cbor:"2,keyasint" json:"time"` // bridge clock, Unix nanoseconds
	Genesis     *Genesis     `cbor:"3,keyasint,omitempty" json:"genesis,omitempty"`
	Measurement *Measurement `cbor:"4,keyasint,omitempty" json:"measurement,omitempty"`
	Reboot      *Reboot      `cbor:"5,keyasint,omitempty" json:"reboot,omitempty"`
	Binding     *Binding     `cbor:"6,keyasint,omitempty" json:"binding,omitempty"`
	Teardown    *Teardown    `cbor:"7,keyasint,omitempty" json:"teardown,omitempty"`
	Action      *Action      `cbor:"8,keyasint,omitempty" json:"action,omitempty"`
	TPM         *TPMEvent    `cbor:"9,keyasint,omitempty" json:"tpm,omitempty"`
	MigratedOut *MigratedOut `cbor:"10,keyasint,omitempty" json:"migrated_out,omitempty"`
	MigratedIn  *MigratedIn  `cbor:"11,keyasint,omitempty" json:"migrated_in,omitempty"`
}

// Terminal reports whether a record of kind k ends its segment of the VM's
// history: a teardown ends the VM's life, a migrated-out its stay on this
// host. Nothing may follow either in the same segment, and the bridge keeps
// a post-mortem quote over it.
func (k Kind) Terminal() bool { return k == KindTeardown || k == KindMigratedOut }

// Genesis is record 0 of a VM instance: who it is and what it was launched
// with (the launch measurement).
type Genesis struct {
	UUID      [16]byte `cbor:"1,keyasint" json:"uuid"`
	Name      string   `cbor:"2,keyasint" json:"name"`
	Instance  [16]byte `cbor:"3,keyasint" json:"instance"`
	CID       uint32   `cbor:"4,keyasint,omitempty" json:"cid,omitempty"`
	DomainXML [32]byte `cbor:"5,keyasint" json:"domain_xml_sha256"`
	Files     []File   `cbor:"6,keyasint,omitempty" json:"files,omitempty"`
	Host      string   `cbor:"7,keyasint,omitempty" json:"host,omitempty"`
	// Epoch is H(R_epoch) of the epoch this instance was launched in. It
	// binds the VM's history to one epoch, so a host root who later opens
	// a forged epoch (say, after a reboot) cannot replant a prefix of the
	// VM's public leaves in it: the genesis commitment names the real one.
	Epoch [32]byte `cbor:"8,keyasint" json:"epoch_sha256"`
	// VTPMBanks, for a VM with a bridge-served vTPM, are the PCR banks
	// (TPM_ALG_IDs) its vTPM may allocate: what a verifier replays its
	// TPM event records with (vpcr.Replay). Empty without a vTPM.
	VTPMBanks []uint16 `cbor:"9,keyasint,omitempty" json:"vtpm_banks,omitempty"`
}

// File is the digest of a file the domain XML names (kernel, initrd, loader,
// nvram). Digest is empty, and Error says why, when the bridge could not
// read it.
type File struct {
	Role   string `cbor:"1,keyasint" json:"role"`
	Path   string `cbor:"2,keyasint" json:"path"`
	SHA256 []byte `cbor:"3,keyasint,omitempty" json:"sha256,omitempty"`
	Error  string `cbor:"4,keyasint,omitempty" json:"error,omitempty"`
}

// Measurement is one guest IMA log entry as the guest agent reported it.
type Measurement struct {
	PCR             uint32 `cbor:"1,keyasint" json:"pcr"`
	TemplateHashAlg string `cbor:"2,keyasint" json:"template_hash_alg"`
	TemplateHash    []byte `cbor:"3,keyasint" json:"template_hash"`
	Template        string `cbor:"4,keyasint" json:"template"`
	TemplateData    []byte `cbor:"5,keyasint" json:"template_data"`
	LogIndex        uint64 `cbor:"6,keyasint" json:"log_index"`
	BootID          string `cbor:"7,keyasint,omitempty" json:"boot_id,omitempty"`
}

// Reboot records a guest reset seen by the host or a new guest boot id.
type Reboot struct {
	Reason string `cbor:"1,keyasint" json:"reason"`
	BootID string `cbor:"2,keyasint,omitempty" json:"boot_id,omitempty"`
}

// Binding binds the hash of a guest public key (TLS or attestation key) to
// this VM, so a verifier talking to the guest can check that its peer is
// the VM the evidence is about.
type Binding struct {
	Purpose string   `cbor:"1,keyasint" json:"purpose"`
	KeyHash [32]byte `cbor:"2,keyasint" json:"key_sha256"`
}

// Teardown is the last record of a VM instance.
type Teardown struct {
	Reason string `cbor:"1,keyasint" json:"reason"`
}

// Action records an enforcement action the bridge took on the VM.
type Action struct {
	Action string `cbor:"1,keyasint" json:"action"`
	Detail string `cbor:"2,keyasint,omitempty" json:"detail,omitempty"`
}

// Epoch is the public record that opens an epoch: global index 0 of the
// first batch the bridge extends after a TPM Reset (host reboot). It binds
// the epoch to that power cycle of the TPM: a verifier requires the quote's
// resetCount to equal ResetCount, and replays the batches from StartValue,
// the value PCR p held when the epoch opened (host boot components may have
// extended it before the bridge started).
type Epoch struct {
	Host          string   `cbor:"1,keyasint" json:"host"`
	BridgeVersion string   `cbor:"2,keyasint" json:"bridge_version"`
	PCR           uint32   `cbor:"3,keyasint" json:"pcr"`
	Time          int64    `cbor:"4,keyasint" json:"time"`
	Nonce         [32]byte `cbor:"5,keyasint" json:"nonce"`
	StartValue    [32]byte `cbor:"6,keyasint" json:"start_value"`   // PCR p when the epoch opened
	ResetCount    uint32   `cbor:"7,keyasint" json:"reset_count"`   // TPM resetCount at opening
	RestartCount  uint32   `cbor:"8,keyasint" json:"restart_count"` // TPM restartCount at opening
	Clock         uint64   `cbor:"9,keyasint" json:"clock"`         // TPM clock (ms) at opening
	AK            [32]byte `cbor:"10,keyasint" json:"ak_sha256"`    // SHA-256 of the AK's DER SubjectPublicKeyInfo
	// ClearDisabled says TPM2_Clear was disabled when the epoch opened:
	// then no host root can set resetCount back (and replay this power
	// cycle) without the platform's authority.
	ClearDisabled bool `cbor:"11,keyasint" json:"clear_disabled"`
}

// EpochHash returns H(R_epoch), the value each genesis record of the epoch names.
func EpochHash(encoded []byte) [32]byte { return sha256.Sum256(encoded) }

var (
	encMode = canon.Enc()
	decMode = canon.Dec(canon.Limits{Nested: 8, Array: 256, Map: 32})
)

// ErrNotCanonical reports an encoding that decodes but is not the canonical
// form of what it decodes to.
var ErrNotCanonical = errors.New("record is not canonically encoded")

// Validate checks that exactly the body Kind names is set and that the
// fields are within protocol bounds.
func (r *Record) Validate() error {
	bodies := 0
	for _, set := range []bool{r.Genesis != nil, r.Measurement != nil, r.Reboot != nil, r.Binding != nil, r.Teardown != nil, r.Action != nil, r.TPM != nil, r.MigratedOut != nil, r.MigratedIn != nil} {
		if set {
			bodies++
		}
	}
	if bodies != 1 {
		return fmt.Errorf("record of kind %s has %d bodies, want 1", r.Kind, bodies)
	}
	ok := false
	switch r.Kind {
	case KindGenesis:
		ok = r.Genesis != nil
	case KindMeasurement:
		ok = r.Measurement != nil
		if ok {
			if err := r.Measurement.validate(); err != nil {
				return err
			}
		}
	case KindReboot:
		ok = r.Reboot != nil
	case KindBinding:
		ok = r.Binding != nil
	case KindTeardown:
		ok = r.Teardown != nil
	case KindAction:
		ok = r.Action != nil
	case KindTPM:
		ok = r.TPM != nil
		if ok {
			if _, err := r.TPM.Event(); err != nil {
				return err
			}
		}
	case KindMigratedOut:
		ok = r.MigratedOut != nil
		if ok && len(r.MigratedOut.DestHost) > maxHostName {
			return fmt.Errorf("migrated-out destination host name of %d bytes", len(r.MigratedOut.DestHost))
		}
	case KindMigratedIn:
		ok = r.MigratedIn != nil
		if ok {
			if err := r.MigratedIn.validate(); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unknown record kind %d", uint8(r.Kind))
	}
	if !ok {
		return fmt.Errorf("record of kind %s carries another kind's body", r.Kind)
	}
	return nil
}

func (m *Measurement) validate() error {
	if m.Template == "" || len(m.Template) > 255 {
		return fmt.Errorf("measurement template name of %d bytes", len(m.Template))
	}
	switch m.TemplateHashAlg {
	case "sha1":
		if len(m.TemplateHash) != 20 {
			return fmt.Errorf("sha1 template hash of %d bytes", len(m.TemplateHash))
		}
	case "sha256":
		if len(m.TemplateHash) != 32 {
			return fmt.Errorf("sha256 template hash of %d bytes", len(m.TemplateHash))
		}
	default:
		return fmt.Errorf("unknown template hash algorithm %q", m.TemplateHashAlg)
	}
	return nil
}

// Marshal returns the canonical encoding R of r.
func (r *Record) Marshal() ([]byte, error) {
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("marshal record: %w", err)
	}
	b, err := encMode.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("marshal record: %w", err)
	}
	if len(b) > MaxSize {
		return nil, fmt.Errorf("marshal record: %d bytes exceeds the %d-byte limit", len(b), MaxSize)
	}
	return b, nil
}

// Unmarshal decodes a canonical record encoding. It rejects oversize input,
// unknown fields, duplicate keys, non-canonical forms and invalid records.
func Unmarshal(b []byte) (*Record, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("record of %d bytes exceeds the %d-byte limit", len(b), MaxSize)
	}
	var r Record
	if err := decMode.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode record: %w", err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("decode record: %w", err)
	}
	again, err := encMode.Marshal(&r)
	if err != nil {
		return nil, fmt.Errorf("decode record: re-encode: %w", err)
	}
	if !bytes.Equal(again, b) {
		return nil, ErrNotCanonical
	}
	return &r, nil
}

// Hash returns H(R), the record digest the commitment c_s covers.
func Hash(encoded []byte) [32]byte { return sha256.Sum256(encoded) }

// Marshal returns the canonical encoding of the epoch record.
func (e *Epoch) Marshal() ([]byte, error) {
	b, err := encMode.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("marshal epoch record: %w", err)
	}
	return b, nil
}

// UnmarshalEpoch decodes a canonical epoch record.
func UnmarshalEpoch(b []byte) (*Epoch, error) {
	if len(b) > 4096 {
		return nil, fmt.Errorf("epoch record of %d bytes exceeds 4096", len(b))
	}
	var e Epoch
	if err := decMode.Unmarshal(b, &e); err != nil {
		return nil, fmt.Errorf("decode epoch record: %w", err)
	}
	again, err := encMode.Marshal(&e)
	if err != nil {
		return nil, fmt.Errorf("decode epoch record: re-encode: %w", err)
	}
	if !bytes.Equal(again, b) {
		return nil, fmt.Errorf("decode epoch record: %w", ErrNotCanonical)
	}
	return &e, nil
}

// CheckTemplateHash checks the template hash against the template data, as
// the guest kernel computed it (the legacy "ima" template hashes a padded
// form and is not checked here). A violation entry's all-zero hash passes.
func (m *Measurement) CheckTemplateHash() error {
	if m.Template == "ima" {
		return nil
	}
	var sum []byte
	switch m.TemplateHashAlg {
	case "sha1":
		h := sha1.Sum(m.TemplateData)
		sum = h[:]
	case "sha256":
		h := sha256.Sum256(m.TemplateData)
		sum = h[:]
	default:
		return fmt.Errorf("unknown template hash algorithm %q", m.TemplateHashAlg)
	}
	if bytes.Equal(sum, m.TemplateHash) || bytes.Equal(m.TemplateHash, make([]byte, len(m.TemplateHash))) {
		return nil
	}
	return fmt.Errorf("template hash %x does not match its template data", m.TemplateHash)
}
