// Package vpcr holds the virtual PCRs of a bridge-served vTPM as a pure
// function of its journal: the event records (Event), the PC-client rules
// they obey (which locality may extend or reset which PCR, the values a PCR
// starts from), and State, which applies events one by one. The vTPM
// (package vtpm) changes its PCRs only by applying the event it has just
// journaled, and a verifier replays the same events with the same code, so
// "the vPCRs are the replay of the journal" holds by construction.
//
// The package does no I/O and imports nothing but hashing, so the pure
// verifier may import it.
package vpcr

import (
	"bytes"
	"crypto"
	_ "crypto/sha1"   // register SHA-1
	_ "crypto/sha256" // register SHA-256
	_ "crypto/sha512" // register SHA-384/512
	"errors"
	"fmt"
	"slices"
	"strings"
)

// NumPCRs is the number of PCRs of a PC-client TPM (PCR 0-23).
const NumPCRs = 24

// MaxLocality is the highest TPM locality (0-4).
const MaxLocality = 4

// Alg is a TPM_ALG_ID of a hash algorithm that can back a PCR bank.
type Alg uint16

// The hash algorithms a bank may use (TPM 2.0 Part 2, TPM_ALG_ID).
const (
	SHA1   Alg = 0x0004
	SHA256 Alg = 0x000B
	SHA384 Alg = 0x000C
	SHA512 Alg = 0x000D
)

// Algs lists every hash algorithm this package knows, in TPM_ALG_ID order:
// the "implemented" hashes of the vTPM.
var algs = [...]Alg{SHA1, SHA256, SHA384, SHA512}

// Implemented returns the hash algorithms a bank may use, in TPM_ALG_ID
// order.
func Implemented() []Alg { return slices.Clone(algs[:]) }

// Hash returns the Go hash for a, or 0 for an unknown algorithm.
func (a Alg) Hash() crypto.Hash {
	switch a {
	case SHA1:
		return crypto.SHA1
	case SHA256:
		return crypto.SHA256
	case SHA384:
		return crypto.SHA384
	case SHA512:
		return crypto.SHA512
	}
	return 0
}

// Known reports whether a is one of the algorithms of Implemented.
func (a Alg) Known() bool { return a.Hash() != 0 }

// Size is the digest size of a in bytes (0 if unknown).
func (a Alg) Size() int {
	if h := a.Hash(); h != 0 {
		return h.Size()
	}
	return 0
}

// String is the algorithm's name as tpm2-tools spells it ("sha256").
func (a Alg) String() string {
	switch a {
	case SHA1:
		return "sha1"
	case SHA256:
		return "sha256"
	case SHA384:
		return "sha384"
	case SHA512:
		return "sha512"
	}
	return fmt.Sprintf("alg-0x%04x", uint16(a))
}

// ParseAlg parses a bank name ("sha1", "sha256", "sha384", "sha512").
func ParseAlg(s string) (Alg, error) {
	for _, a := range algs {
		if strings.EqualFold(s, a.String()) {
			return a, nil
		}
	}
	return 0, fmt.Errorf("unknown PCR bank %q (want one of sha1, sha256, sha384, sha512)", s)
}

// CheckBanks validates a bank list: non-empty, known algorithms, no
// duplicates. It returns the banks sorted by TPM_ALG_ID.
func CheckBanks(banks []Alg) ([]Alg, error) {
	if len(banks) == 0 {
		return nil, errors.New("no PCR bank configured (want at least one of sha1, sha256, sha384, sha512)")
	}
	out := slices.Clone(banks)
	slices.Sort(out)
	for i, a := range out {
		if !a.Known() {
			return nil, fmt.Errorf("PCR bank %v is not supported (want sha1, sha256, sha384 or sha512)", a)
		}
		if i > 0 && out[i-1] == a {
			return nil, fmt.Errorf("PCR bank %v given twice", a)
		}
	}
	return out, nil
}

// Kind says what an Event does to the vPCRs.
type Kind uint8

// Event kinds.
const (
	// KindInit is TPM_Init: QEMU's CMD_INIT at power-on or machine reset.
	// The PCRs keep their values, but the TPM now waits for TPM2_Startup.
	KindInit Kind = 1 + iota
	// KindStartup is the TPM2_Startup(CLEAR) after an Init: a TPM Reset.
	// Every PCR of every active bank returns to its initial value, and a
	// pending PCR_Allocate takes effect. It is the guest's reboot record.
	KindStartup
	// KindExtend is a PCR_Extend or PCR_Event: each digest is extended
	// into its bank's PCR.
	KindExtend
	// KindReset is a PCR_Reset of a resettable PCR (16 or 23 at localities
	// 0-3 under the PC-client rules): it goes back to zero in every bank.
	KindReset
	// KindAllocate is a PCR_Allocate: Banks become the active banks at the
	// next Startup(CLEAR).
	KindAllocate
)

// String names the kind.
func (k Kind) String() string {
	switch k {
	case KindInit:
		return "init"
	case KindStartup:
		return "startup"
	case KindExtend:
		return "extend"
	case KindReset:
		return "reset"
	case KindAllocate:
		return "allocate"
	}
	return fmt.Sprintf("kind-%d", uint8(k))
}

// Digest is one bank's digest of an extend.
type Digest struct {
	Alg   Alg
	Value []byte
}

// Event is one journal record of a vTPM: everything that changes its PCRs
// (or what a later Startup does to them), in the order the vTPM executed
// it. The multiplexer stores these in the VM's concealed log; Replay turns
// them back into PCR values.
type Event struct {
	// Seq is the event's ordinal in the vTPM's life: 1 for the first, then
	// consecutive across reboots and bridge restarts.
	Seq uint64
	// Kind is what the event does.
	Kind Kind
	// Command is the TPM command code that caused it (TPM_CC_PCR_Extend,
	// TPM_CC_PCR_Event, TPM_CC_PCR_Reset, TPM_CC_Startup,
	// TPM_CC_PCR_Allocate), 0 for KindInit.
	Command uint32
	// Locality is the TPM locality the command came from (0-4).
	Locality uint8
	// PCR is the PCR index of KindExtend and KindReset.
	PCR int
	// Digests are KindExtend's digests, in the order the guest listed
	// them; each is extended into its bank's PCR in that order (a bank
	// listed twice is extended twice, as on a hardware TPM). A bank the
	// guest left out, or that is not active, is not extended and has no
	// digest here.
	Digests []Digest
	// Banks are, for KindAllocate, the banks to activate at the next
	// Startup(CLEAR), and for KindStartup, the banks active after it.
	Banks []Alg
	// Data is the eventData of a PCR_Event (at most 1024 bytes), whose
	// digests are Digests; nil for PCR_Extend.
	Data []byte
}

// String is a one-line description for logs.
func (e Event) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d %v loc=%d", e.Seq, e.Kind, e.Locality)
	switch e.Kind {
	case KindExtend:
		fmt.Fprintf(&b, " pcr=%d", e.PCR)
		for _, d := range e.Digests {
			fmt.Fprintf(&b, " %v:%x", d.Alg, d.Value)
		}
	case KindReset:
		fmt.Fprintf(&b, " pcr=%d", e.PCR)
	case KindAllocate, KindStartup:
		fmt.Fprintf(&b, " banks=%v", e.Banks)
	}
	return b.String()
}

// Attributes of PCR i under the PC-client profile, as in the TCG reference
// implementation's PCR attribute table: bit l of ExtendLocalities (or
// ResetLocalities) set means locality l may extend (reset) the PCR.
type Attributes struct {
	StateSave        bool
	ResetLocalities  uint8
	ExtendLocalities uint8
}

// PCRAttributes returns the attributes of PCR i (0-23).
func PCRAttributes(i int) Attributes {
	switch {
	case i >= 0 && i <= 15:
		return Attributes{StateSave: true, ResetLocalities: 0, ExtendLocalities: 0x1F}
	case i == 16 || i == 23: // debug, application
		return Attributes{ResetLocalities: 0x0F, ExtendLocalities: 0x1F}
	case i >= 17 && i <= 19: // D-RTM
		return Attributes{ResetLocalities: 0x10, ExtendLocalities: 0x1C}
	case i == 20:
		return Attributes{ResetLocalities: 0x14, ExtendLocalities: 0x0E}
	case i == 21 || i == 22:
		return Attributes{ResetLocalities: 0x14, ExtendLocalities: 0x04}
	}
	return Attributes{}
}

// CanExtend reports whether locality loc may extend PCR i.
func CanExtend(i int, loc uint8) bool {
	return i >= 0 && i < NumPCRs && loc <= MaxLocality && PCRAttributes(i).ExtendLocalities&(1<<loc) != 0
}

// CanReset reports whether locality loc may PCR_Reset PCR i: never PCRs
// 0-15; 16 and 23 at localities 0-3; 17-22 only from the D-RTM localities.
func CanReset(i int, loc uint8) bool {
	return i >= 0 && i < NumPCRs && loc <= MaxLocality && PCRAttributes(i).ResetLocalities&(1<<loc) != 0
}

// InitialValue is PCR i's value after a TPM Reset (Startup(CLEAR)) at
// locality loc in a bank of digest size n: zeros, except the D-RTM PCRs
// 17-22, which start at all ones (no D-RTM happened), and PCR 0, whose last
// byte is 3 when the startup came from locality 3.
func InitialValue(i int, loc uint8, n int) []byte {
	v := make([]byte, n)
	switch {
	case i >= 17 && i <= 22:
		for j := range v {
			v[j] = 0xFF
		}
	case i == 0 && loc == 3 && n > 0:
		v[n-1] = 3
	}
	return v
}

// Phase is where the TPM is in its power cycle.
type Phase uint8

// Phases.
const (
	// PhaseOff: no TPM_Init yet (the VM has not powered on).
	PhaseOff Phase = iota
	// PhaseInit: after TPM_Init, waiting for TPM2_Startup.
	PhaseInit
	// PhaseRunning: after TPM2_Startup; commands run.
	PhaseRunning
)

// String names the phase.
func (p Phase) String() string {
	switch p {
	case PhaseOff:
		return "off"
	case PhaseInit:
		return "init"
	case PhaseRunning:
		return "running"
	}
	return fmt.Sprintf("phase-%d", uint8(p))
}

// State is the replayed state of a vTPM's PCRs. Its zero value is not
// usable; make one with New. It is not safe for concurrent use.
type State struct {
	allocatable []Alg
	active      []Alg
	pending     []Alg
	values      [][]byte // per active bank, in active order: its NumPCRs values back to back (pcr), one allocation, not 24
	phase       Phase
	seq         uint64
	updates     uint32 // pcrUpdateCounter
	resets      uint32 // Startup(CLEAR) count: TPMS_CLOCK_INFO.resetCount
}

// New returns the state of a vTPM that has never run: every bank in
// allocatable active, all PCRs zero, phase off, no events.
func New(allocatable []Alg) (*State, error) {
	banks, err := CheckBanks(allocatable)
	if err != nil {
		return nil, err
	}
	s := &State{allocatable: banks}
	s.activate(banks, 0)
	return s, nil
}

// Replay returns the state after applying events, in order, to New(allocatable).
func Replay(allocatable []Alg, events []Event) (*State, error) {
	s, err := New(allocatable)
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

func (s *State) activate(banks []Alg, loc uint8) {
	s.active = slices.Clone(banks)
	s.values = make([][]byte, len(banks))
	for b, a := range banks {
		s.values[b] = make([]byte, NumPCRs*a.Size())
		for i := range NumPCRs {
			copy(s.pcr(b, i), InitialValue(i, loc, a.Size()))
		}
	}
}

// pcr returns PCR i of the bank at index b of s.active: its bytes in
// s.values, which writes through.
func (s *State) pcr(b, i int) []byte {
	n := s.active[b].Size()
	return s.values[b][i*n : (i+1)*n : (i+1)*n]
}

// Clone returns a deep copy.
func (s *State) Clone() *State {
	c := *s
	c.allocatable = slices.Clone(s.allocatable)
	c.active = slices.Clone(s.active)
	c.pending = slices.Clone(s.pending)
	c.values = make([][]byte, len(s.values))
	for b := range s.values {
		c.values[b] = slices.Clone(s.values[b])
	}
	return &c
}

// Allocatable returns the banks the operator configured: those PCR_Allocate
// may choose from.
func (s *State) Allocatable() []Alg { return slices.Clone(s.allocatable) }

// Active returns the active banks, in TPM_ALG_ID order.
func (s *State) Active() []Alg { return slices.Clone(s.active) }

// Pending returns the banks a PCR_Allocate asked for at the next
// Startup(CLEAR), or nil.
func (s *State) Pending() []Alg { return slices.Clone(s.pending) }

// IsActive reports whether a is an active bank.
func (s *State) IsActive(a Alg) bool { return slices.Contains(s.active, a) }

// Phase returns the power phase.
func (s *State) Phase() Phase { return s.phase }

// Seq returns the Seq of the last applied event (0 if none).
func (s *State) Seq() uint64 { return s.seq }

// UpdateCounter is TPM2_PCR_Read's pcrUpdateCounter: PCR changes since the
// last Startup.
func (s *State) UpdateCounter() uint32 { return s.updates }

// ResetCount is the number of Startup(CLEAR)s so far.
func (s *State) ResetCount() uint32 { return s.resets }

// Read returns a copy of PCR i of bank a, or nil if a is not active or i is
// out of range.
func (s *State) Read(a Alg, i int) []byte {
	b := slices.Index(s.active, a)
	if b < 0 || i < 0 || i >= NumPCRs {
		return nil
	}
	return slices.Clone(s.pcr(b, i))
}

// Apply checks e against the state and the PC-client rules and applies it.
// On error the state is unchanged.
func (s *State) Apply(e Event) error {
	if err := s.Check(e); err != nil {
		return err
	}
	s.apply(e)
	return nil
}

// Check reports whether Apply(e) would succeed, changing nothing.
func (s *State) Check(e Event) error {
	if e.Seq != s.seq+1 {
		return fmt.Errorf("vpcr: event %v out of order: want seq %d", e, s.seq+1)
	}
	if e.Locality > MaxLocality {
		return fmt.Errorf("vpcr: event %v: locality %d out of range 0-4", e, e.Locality)
	}
	switch e.Kind {
	case KindInit:
	case KindStartup:
		if s.phase != PhaseInit {
			return fmt.Errorf("vpcr: event %v: Startup without a preceding Init (phase %v)", e, s.phase)
		}
		next := s.active
		if s.pending != nil {
			next = s.pending
		}
		if !slices.Equal(e.Banks, next) {
			return fmt.Errorf("vpcr: event %v: banks %v after startup, want %v", e, e.Banks, next)
		}
	case KindExtend:
		if err := s.checkPCROp(e, CanExtend); err != nil {
			return err
		}
		if len(e.Digests) == 0 {
			return fmt.Errorf("vpcr: event %v: extend with no digest", e)
		}
		for _, d := range e.Digests {
			if !s.IsActive(d.Alg) {
				return fmt.Errorf("vpcr: event %v: digest for bank %v, which is not active", e, d.Alg)
			}
			if len(d.Value) != d.Alg.Size() {
				return fmt.Errorf("vpcr: event %v: %v digest of %d bytes", e, d.Alg, len(d.Value))
			}
		}
		if len(e.Data) > 1024 {
			return fmt.Errorf("vpcr: event %v: event data of %d bytes (max 1024)", e, len(e.Data))
		}
	case KindReset:
		if err := s.checkPCROp(e, CanReset); err != nil {
			return err
		}
	case KindAllocate:
		banks, err := CheckBanks(e.Banks)
		if err != nil || !slices.Equal(banks, e.Banks) {
			return fmt.Errorf("vpcr: event %v: bad bank list: %v", e, err)
		}
		for _, a := range banks {
			if !slices.Contains(s.allocatable, a) {
				return fmt.Errorf("vpcr: event %v: bank %v is not allocatable (have %v)", e, a, s.allocatable)
			}
		}
		if s.phase != PhaseRunning {
			return fmt.Errorf("vpcr: event %v: TPM not running", e)
		}
	default:
		return fmt.Errorf("vpcr: event %v: unknown kind", e)
	}
	return nil
}

// apply applies a checked event.
func (s *State) apply(e Event) {
	switch e.Kind {
	case KindInit:
		s.phase = PhaseInit
	case KindStartup:
		next := s.active
		if s.pending != nil {
			next = s.pending
		}
		s.activate(next, e.Locality)
		s.pending = nil
		s.updates = 0
		s.resets++
		s.phase = PhaseRunning
	case KindExtend:
		for _, d := range e.Digests {
			b := slices.Index(s.active, d.Alg)
			h := d.Alg.Hash().New()
			v := s.pcr(b, e.PCR)
			h.Write(v)
			h.Write(d.Value)
			h.Sum(v[:0]) // in place: v's capacity is the digest's size
		}
		s.updates++
	case KindReset:
		for b := range s.active {
			clear(s.pcr(b, e.PCR))
		}
		s.updates++
	case KindAllocate:
		s.pending = slices.Clone(e.Banks)
	}
	s.seq = e.Seq
}

func (s *State) checkPCROp(e Event, allowed func(int, uint8) bool) error {
	if s.phase != PhaseRunning {
		return fmt.Errorf("vpcr: event %v: TPM not running (phase %v)", e, s.phase)
	}
	if e.PCR < 0 || e.PCR >= NumPCRs {
		return fmt.Errorf("vpcr: event %v: PCR %d out of range", e, e.PCR)
	}
	if !allowed(e.PCR, e.Locality) {
		return fmt.Errorf("vpcr: event %v: locality %d may not %v PCR %d", e, e.Locality, e.Kind, e.PCR)
	}
	return nil
}

// Equal reports whether two states have the same banks, phase and PCR values.
func (s *State) Equal(o *State) bool {
	if !slices.Equal(s.active, o.active) || !slices.Equal(s.pending, o.pending) || s.phase != o.phase ||
		s.seq != o.seq || s.updates != o.updates || s.resets != o.resets {
		return false
	}
	for b := range s.values {
		if !bytes.Equal(s.values[b], o.values[b]) {
			return false
		}
	}
	return true
}
