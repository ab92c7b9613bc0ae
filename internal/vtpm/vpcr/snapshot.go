package vpcr

import (
	"fmt"
	"slices"
)

// Snapshot is a State written out: what a VM's vPCRs were when it left a
// host by live migration. The destination starts its vTPM from it and
// replays its own events on top (FromSnapshot, Replay's ReplayFrom), and a
// verifier checks it against its replay of the earlier hosts' events, so
// the guest's PCRs are continuous across hosts and still a pure function
// of the VM's records. The CBOR keys make it embeddable in a record.
type Snapshot struct {
	Allocatable []Alg        `cbor:"1,keyasint" json:"allocatable"`
	Active      []Alg        `cbor:"2,keyasint" json:"active"`
	Pending     []Alg        `cbor:"3,keyasint,omitempty" json:"pending,omitempty"`
	Values      []BankValues `cbor:"4,keyasint" json:"values"` // one per active bank, in Active order
	Phase       Phase        `cbor:"5,keyasint" json:"phase"`
	Seq         uint64       `cbor:"6,keyasint" json:"seq"`
	Updates     uint32       `cbor:"7,keyasint" json:"updates"`
	Resets      uint32       `cbor:"8,keyasint" json:"resets"`
}

// BankValues are the 24 PCR values of one bank.
type BankValues struct {
	Alg  Alg      `cbor:"1,keyasint" json:"alg"`
	PCRs [][]byte `cbor:"2,keyasint" json:"pcrs"`
}

// Snapshot writes the state out (a deep copy).
func (s *State) Snapshot() *Snapshot {
	sn := &Snapshot{
		Allocatable: slices.Clone(s.allocatable),
		Active:      slices.Clone(s.active),
		Pending:     slices.Clone(s.pending),
		Phase:       s.phase,
		Seq:         s.seq,
		Updates:     s.updates,
		Resets:      s.resets,
	}
	for b, a := range s.active {
		bv := BankValues{Alg: a, PCRs: make([][]byte, NumPCRs)}
		for i := range NumPCRs {
			bv.PCRs[i] = slices.Clone(s.pcr(b, i))
		}
		sn.Values = append(sn.Values, bv)
	}
	return sn
}

// FromSnapshot returns the State sn describes, after checking that it is
// one a vTPM could be in: known, ordered banks, the active and pending
// banks allocatable, one full set of PCR values of the right size per
// active bank, a known phase. A snapshot comes from another host, so it is
// checked like any input.
func FromSnapshot(sn *Snapshot) (*State, error) {
	if sn == nil {
		return nil, fmt.Errorf("vpcr: no snapshot")
	}
	alloc, err := CheckBanks(sn.Allocatable)
	if err != nil || !slices.Equal(alloc, sn.Allocatable) {
		return nil, fmt.Errorf("vpcr: snapshot: allocatable banks %v: %v", sn.Allocatable, err)
	}
	if len(sn.Active) == 0 {
		return nil, fmt.Errorf("vpcr: snapshot: no active bank")
	}
	for _, set := range [][]Alg{sn.Active, sn.Pending} {
		if len(set) == 0 {
			continue // no pending allocation
		}
		banks, err := CheckBanks(set)
		if err != nil || !slices.Equal(banks, set) {
			return nil, fmt.Errorf("vpcr: snapshot: banks %v: %v", set, err)
		}
		for _, a := range set {
			if !slices.Contains(alloc, a) {
				return nil, fmt.Errorf("vpcr: snapshot: bank %v is not allocatable", a)
			}
		}
	}
	if len(sn.Values) != len(sn.Active) {
		return nil, fmt.Errorf("vpcr: snapshot: %d banks of values for %d active banks", len(sn.Values), len(sn.Active))
	}
	if sn.Phase > PhaseRunning {
		return nil, fmt.Errorf("vpcr: snapshot: unknown phase %d", sn.Phase)
	}
	s := &State{
		allocatable: alloc,
		active:      slices.Clone(sn.Active),
		phase:       sn.Phase,
		seq:         sn.Seq,
		updates:     sn.Updates,
		resets:      sn.Resets,
		values:      make([][]byte, len(sn.Active)),
	}
	if len(sn.Pending) > 0 {
		s.pending = slices.Clone(sn.Pending)
	}
	for b, a := range sn.Active {
		s.values[b] = make([]byte, NumPCRs*a.Size())
		bv := sn.Values[b]
		if bv.Alg != a {
			return nil, fmt.Errorf("vpcr: snapshot: values of bank %v where %v is active", bv.Alg, a)
		}
		if len(bv.PCRs) != NumPCRs {
			return nil, fmt.Errorf("vpcr: snapshot: bank %v has %d PCRs, want %d", a, len(bv.PCRs), NumPCRs)
		}
		for i, v := range bv.PCRs {
			if len(v) != a.Size() {
				return nil, fmt.Errorf("vpcr: snapshot: bank %v PCR %d is %d bytes, want %d", a, i, len(v), a.Size())
			}
			copy(s.pcr(b, i), v)
		}
	}
	return s, nil
}

// ReplayFrom returns the state after applying events, in order, to the
// state sn describes (a VM that migrated in: its vPCRs when it arrived,
// then this host's events). A nil sn is Replay(allocatable, events).
func ReplayFrom(allocatable []Alg, sn *Snapshot, events []Event) (*State, error) {
	if sn == nil {
		return Replay(allocatable, events)
	}
	s, err := FromSnapshot(sn)
	if err != nil {
		return nil, err
	}
	for _, e := range events {
		if err := s.Apply(e); err != nil {
			return nil, err
		}
	}
	return s, nil
}
