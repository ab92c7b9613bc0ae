package verify

import (
	"bytes"
	"crypto"
	"encoding/hex"
	"fmt"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// imaPCR is the PCR the guest kernel's IMA extends.
const imaPCR = 10

// VTPMReport is what the verifier reconstructed of a VM's bridge-served
// vTPM (vTPM mode): its virtual PCRs as a TPM would report them, and how
// the agent's IMA entries paired with the anchored PCR 10 extends.
type VTPMReport struct {
	// Banks are the active banks; PCRs[bank][i] is vPCR i, hex.
	Banks []string            `json:"banks"`
	PCRs  map[string][]string `json:"pcrs"`
	// Events counts the vTPM's event records; Boots its Startup(CLEAR)s.
	Events int `json:"events"`
	Boots  int `json:"boots"`
	// Paired is how many IMA entries matched an anchored extend one to
	// one, in order; BootAggregates how many boot_aggregate entries were
	// checked against the vPCRs 0-9 of their boot.
	Paired         int `json:"paired"`
	BootAggregates int `json:"boot_aggregates_checked"`
	// Unexplained are anchored PCR 10 extends no IMA entry accounts for
	// (an entry the guest suppressed, or one its agent has not sent).
	Unexplained []RecordRef `json:"unexplained,omitempty"`
}

// tpmBoot is one power-on of the vTPM as its records show it.
type tpmBoot struct {
	extends []pairedExtend // PCR 10 extends, in order
	pcrs09  [][]byte       // vPCRs 0-9 (sha256 bank, or sha1) before the first of them
	agent   string         // the agent boot id that belongs to this boot
}

type pairedExtend struct {
	s uint64
	e vpcr.Event
}

// vtpmTrack collects, during step 4, what the vTPM check needs.
type vtpmTrack struct {
	banks   []vpcr.Alg
	state   *vpcr.State
	boots   []*tpmBoot
	byBoot  map[string]*tpmBoot // agent boot id -> the vTPM boot current when it first appeared
	entries map[string][]measured
	events  int
	// taken: the track starts from a migrated-in record's vPCRs whose
	// earlier events were not verified (Options.LastSegmentOnly), so IMA
	// entries of a boot begun on an earlier host cannot be paired.
	taken bool
}

// newVTPMTrackFrom is newVTPMTrack from the vPCRs a VM arrived with.
func newVTPMTrackFrom(banks []uint16, sn *vpcr.Snapshot) (*vtpmTrack, error) {
	t, err := newVTPMTrack(banks)
	if err != nil {
		return nil, err
	}
	if t.state, err = vpcr.FromSnapshot(sn); err != nil {
		return nil, err
	}
	return t, nil
}

type measured struct {
	s uint64
	m *record.Measurement
}

func newVTPMTrack(banks []uint16) (*vtpmTrack, error) {
	var as []vpcr.Alg
	for _, b := range banks {
		as = append(as, vpcr.Alg(b))
	}
	st, err := vpcr.New(as)
	if err != nil {
		return nil, err
	}
	return &vtpmTrack{banks: as, state: st, byBoot: map[string]*tpmBoot{}, entries: map[string][]measured{}}, nil
}

// add folds one verified record into the track.
func (t *vtpmTrack) add(s uint64, rec *record.Record) error {
	switch rec.Kind {
	case record.KindTPM:
		e, err := rec.TPM.Event()
		if err != nil {
			return reject(4, "record %d: %v", s, err)
		}
		if err := t.state.Apply(e); err != nil {
			return reject(4, "record %d: vTPM event %v breaks the TPM's rules: %v", s, e, err)
		}
		t.events++
		switch {
		case e.Kind == vpcr.KindStartup:
			t.boots = append(t.boots, &tpmBoot{})
		case e.Kind == vpcr.KindExtend && e.PCR == imaPCR && len(t.boots) > 0:
			b := t.boots[len(t.boots)-1]
			if len(b.extends) == 0 {
				b.pcrs09 = t.readPCRs09()
			}
			b.extends = append(b.extends, pairedExtend{s: s, e: e})
		}
	case record.KindReboot:
		t.sawBoot(rec.Reboot.BootID)
	case record.KindMeasurement:
		t.sawBoot(rec.Measurement.BootID)
		t.entries[rec.Measurement.BootID] = append(t.entries[rec.Measurement.BootID], measured{s: s, m: rec.Measurement})
	}
	return nil
}

// sawBoot binds an agent boot id to the vTPM boot current where the host
// first recorded it (the agent can only run after its kernel started the
// vTPM): the host's record order, not the guest's word, decides.
func (t *vtpmTrack) sawBoot(id string) {
	if id == "" || len(t.boots) == 0 {
		return
	}
	if _, ok := t.byBoot[id]; ok {
		return
	}
	b := t.boots[len(t.boots)-1]
	if b.agent != "" {
		return // a second agent boot id in one vTPM boot: its entries pair with nothing
	}
	b.agent = id
	t.byBoot[id] = b
}

// readPCRs09 returns vPCRs 0-9 of the bank boot_aggregate is computed over.
func (t *vtpmTrack) readPCRs09() [][]byte {
	bank := vpcr.SHA256
	if !t.state.IsActive(bank) {
		bank = vpcr.SHA1
	}
	out := make([][]byte, 10)
	for i := range out {
		out[i] = t.state.Read(bank, i)
	}
	return out
}

// check pairs every vTPM boot's anchored PCR 10 extends one to one, in
// order, with the IMA entries of the agent boot that belongs to it, checks
// each boot_aggregate against the boot's vPCRs 0-9, and reports the vPCRs.
// An extend with no entry (suppressed or not yet sent), an entry with no
// extend (invented), and an entry that differs from its extend (reordered
// or altered) are rejections that name the record.
func (t *vtpmTrack) check(rep *Report) error {
	vr := &VTPMReport{PCRs: map[string][]string{}, Events: t.events, Boots: len(t.boots)}
	rep.VTPM = vr
	if t.taken {
		t.entries, t.boots = nil, nil // no pairing: see vtpmTrack.taken
	}
	for _, a := range t.state.Active() {
		vr.Banks = append(vr.Banks, a.String())
		vals := make([]string, vpcr.NumPCRs)
		for i := range vals {
			vals[i] = hex.EncodeToString(t.state.Read(a, i))
		}
		vr.PCRs[a.String()] = vals
	}
	for id, ms := range t.entries {
		if _, ok := t.byBoot[id]; !ok && len(ms) > 0 {
			return reject(4, "record %d: IMA entry of guest boot %q, which no vTPM boot accounts for: invented", ms[0].s, id)
		}
	}
	for _, b := range t.boots {
		ms := t.entries[b.agent]
		for i, x := range b.extends {
			if i >= len(ms) {
				vr.Unexplained = append(vr.Unexplained, RecordRef{Seq: x.s, Detail: fmt.Sprintf("PCR %d extend %s", x.e.PCR, digestsOf(x.e))})
				continue
			}
			if err := pair(x, ms[i], b.pcrs09, vr); err != nil {
				return err
			}
			vr.Paired++
		}
		if len(ms) > len(b.extends) {
			m := ms[len(b.extends)]
			return reject(4, "record %d: IMA entry %d (%s) has no anchored extend in its boot: invented", m.s, m.m.LogIndex, m.m.Template)
		}
	}
	if n := len(vr.Unexplained); n > 0 {
		u := vr.Unexplained[0]
		return reject(4, "record %d: anchored PCR 10 extend with no IMA entry (%d unexplained): the guest suppressed the entry, or its agent has not sent it", u.Seq, n)
	}
	return nil
}

// pair checks that IMA entry m is what the kernel extended in x: the
// digest of each bank is that bank's hash of the template data (all ones
// for a violation entry), and a boot_aggregate entry hashes the boot's
// vPCRs 0-9.
func pair(x pairedExtend, m measured, pcrs09 [][]byte, vr *VTPMReport) error {
	if m.m.PCR != uint32(x.e.PCR) {
		return reject(4, "record %d: IMA entry %d is for PCR %d, its anchored extend (record %d) for PCR %d", m.s, m.m.LogIndex, m.m.PCR, x.s, x.e.PCR)
	}
	violation := isZero(m.m.TemplateHash)
	bound := violation || m.m.Template == "ima" // a bank holds the entry's own hash (vtpm_fallback.go)
	for _, d := range x.e.Digests {
		h := d.Alg.Hash()
		want := bytes.Repeat([]byte{0xff}, h.Size())
		if !violation {
			hh := h.New()
			hh.Write(m.m.TemplateData)
			want = hh.Sum(nil)
		}
		if m.m.Template == "ima" {
			continue // the legacy template hashes a padded form
		}
		if bytes.Equal(d.Value, want) {
			bound = true
		} else if violation || !imaFallback(d, m.m.TemplateData) {
			return reject(4, "record %d: IMA entry %d does not match the anchored extend at record %d (%v bank): entries reordered or altered", m.s, m.m.LogIndex, x.s, d.Alg)
		}
	}
	if !bound {
		return reject(4, "record %d: the anchored extend at record %d holds only IMA's fallback digests (no bank the guest kernel could hash): it cannot be paired with IMA entry %d", m.s, x.s, m.m.LogIndex)
	}
	if m.m.LogIndex != 0 {
		return nil
	}
	f, err := ima.DecodeTemplate(m.m.Template, m.m.TemplateData)
	if err != nil || f.Path != "boot_aggregate" {
		return nil
	}
	bank := crypto.SHA256
	if len(pcrs09) > 0 && len(pcrs09[0]) == crypto.SHA1.Size() {
		bank = crypto.SHA1
	}
	if len(f.Digest) != bank.Size() {
		return nil // aggregated over another bank than the vTPM's
	}
	want, err := ima.BootAggregate(bank, pcrs09)
	if err != nil {
		return reject(4, "record %d: boot_aggregate: %v", m.s, err)
	}
	if !bytes.Equal(f.Digest, want) {
		return reject(4, "record %d: boot_aggregate %x is not the hash of the boot's vPCRs 0-9 (%x)", m.s, f.Digest, want)
	}
	vr.BootAggregates++
	return nil
}

func digestsOf(e vpcr.Event) string {
	var b bytes.Buffer
	for i, d := range e.Digests {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%v:%x", d.Alg, d.Value[:min(8, len(d.Value))])
	}
	return b.String()
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return len(b) > 0
}
