package migrate

import (
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Limits of one message on the peer channel.
const (
	maxRequest  = 64 << 10
	maxResponse = 256 << 20 // a handover carries the final evidence of the chain
)

// Nonce is a destination's handover nonce (32 bytes, hex in JSON).
type Nonce [32]byte

// MarshalJSON writes the nonce as hex.
func (n Nonce) MarshalJSON() ([]byte, error) { return json.Marshal(hex.EncodeToString(n[:])) }

// UnmarshalJSON reads 64 hex digits.
func (n *Nonce) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := hex.DecodeString(s)
	if err != nil || len(v) != len(n) {
		return fmt.Errorf("nonce %q: want 64 hex digits", s)
	}
	copy(n[:], v)
	return nil
}

// ReserveRequest is sent by the destination at libvirt's "migrate begin":
// reserve VM uuid (name) for this destination and this nonce.
type ReserveRequest struct {
	UUID     string `json:"uuid"`
	Name     string `json:"name"`
	DestHost string `json:"dest_host"`
	Nonce    Nonce  `json:"nonce"`
}

// ReserveResponse is the source's acceptance.
type ReserveResponse struct {
	SourceHost string `json:"source_host"`
}

// HandoverRequest asks for the handover of a reserved VM (long poll: the
// source answers when the VM has stopped with reason migrated), or
// cancels the reservation, or acknowledges a completed handover (done).
type HandoverRequest struct {
	UUID  string `json:"uuid"`
	Nonce Nonce  `json:"nonce"`
}

// Handover is the source's answer: the credential only the destination's
// TPM activates, the identity sealed with its secret, and the final
// evidence of the VM's chain so far.
type Handover struct {
	UUID       string     `json:"uuid"`
	Nonce      Nonce      `json:"nonce"`
	SourceHost string     `json:"source_host"`
	DestHost   string     `json:"dest_host"`
	Credential Credential `json:"credential"`
	// Sealed is the AES-GCM box of the sealed payload (Seal), bound to
	// uuid, nonce, both hosts, the destination's AK and the credential.
	Sealed []byte `json:"sealed"`
	// Evidence is the source's final evidence of the VM (CBOR), taken
	// after its migrated-out record.
	Evidence []byte `json:"evidence,omitempty"`
}

// payload is what Sealed holds.
type payload struct {
	Identity conceal.Identity `json:"identity"`
	VPCRs    *vpcr.Snapshot   `json:"vpcrs,omitempty"`
}

// errorBody is every refusal's body.
type errorBody struct {
	Error string `json:"error"`
}
