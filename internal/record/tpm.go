package record

import (
	"fmt"

	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// TPMEvent is one event of a VM's bridge-served vTPM, as the vTPM executed
// it (vpcr.Event): a PCR_Extend or PCR_Event, a PCR_Reset, a TPM_Init, a
// Startup(CLEAR) (the guest rebooted) or a PCR_Allocate. The guest's
// command returned only after this record was durable (or anchored), so
// the VM's virtual PCRs are always the replay of these records.
type TPMEvent struct {
	Seq      uint64      `cbor:"1,keyasint" json:"seq"`
	Kind     uint8       `cbor:"2,keyasint" json:"kind"`
	Command  uint32      `cbor:"3,keyasint,omitempty" json:"command,omitempty"`
	Locality uint8       `cbor:"4,keyasint,omitempty" json:"locality,omitempty"`
	PCR      uint8       `cbor:"5,keyasint,omitempty" json:"pcr,omitempty"`
	Digests  []TPMDigest `cbor:"6,keyasint,omitempty" json:"digests,omitempty"`
	Banks    []uint16    `cbor:"7,keyasint,omitempty" json:"banks,omitempty"`
	Data     []byte      `cbor:"8,keyasint,omitempty" json:"data,omitempty"`
}

// TPMDigest is one bank's digest of an extend.
type TPMDigest struct {
	Alg    uint16 `cbor:"1,keyasint" json:"alg"`
	Digest []byte `cbor:"2,keyasint" json:"digest"`
}

// maxTPMEventData bounds PCR_Event's eventData (TPM2B_EVENT: 1024 bytes).
const maxTPMEventData = 1024

// NewTPM returns the record of vTPM event e at time (Unix ns).
func NewTPM(e vpcr.Event, time int64) *Record {
	t := &TPMEvent{Seq: e.Seq, Kind: uint8(e.Kind), Command: e.Command, Locality: e.Locality, PCR: uint8(e.PCR), Data: e.Data}
	for _, d := range e.Digests {
		t.Digests = append(t.Digests, TPMDigest{Alg: uint16(d.Alg), Digest: d.Value})
	}
	for _, b := range e.Banks {
		t.Banks = append(t.Banks, uint16(b))
	}
	return &Record{Kind: KindTPM, Time: time, TPM: t}
}

// Event converts the record back to the vTPM event, checking that its
// fields are in range (the PC-client and locality rules are vpcr's, checked
// when the event is replayed).
func (t *TPMEvent) Event() (vpcr.Event, error) {
	k := vpcr.Kind(t.Kind)
	switch k {
	case vpcr.KindInit, vpcr.KindStartup, vpcr.KindExtend, vpcr.KindReset, vpcr.KindAllocate:
	default:
		return vpcr.Event{}, fmt.Errorf("tpm event of unknown kind %d", t.Kind)
	}
	if int(t.PCR) >= vpcr.NumPCRs || t.Locality > vpcr.MaxLocality {
		return vpcr.Event{}, fmt.Errorf("tpm event for PCR %d at locality %d", t.PCR, t.Locality)
	}
	if len(t.Data) > maxTPMEventData || len(t.Digests) > 8 || len(t.Banks) > 8 {
		return vpcr.Event{}, fmt.Errorf("tpm event with %d bytes of data, %d digests, %d banks", len(t.Data), len(t.Digests), len(t.Banks))
	}
	e := vpcr.Event{Seq: t.Seq, Kind: k, Command: t.Command, Locality: t.Locality, PCR: int(t.PCR), Data: t.Data}
	for _, d := range t.Digests {
		a := vpcr.Alg(d.Alg)
		if a.Size() == 0 || len(d.Digest) != a.Size() {
			return vpcr.Event{}, fmt.Errorf("tpm event digest of %d bytes for bank %v", len(d.Digest), a)
		}
		e.Digests = append(e.Digests, vpcr.Digest{Alg: a, Value: d.Digest})
	}
	for _, b := range t.Banks {
		e.Banks = append(e.Banks, vpcr.Alg(b))
	}
	return e, nil
}
