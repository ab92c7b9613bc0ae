package verify

import (
	"encoding/hex"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/record"
)

// Report is the verifier's JSON report (step 6).
type Report struct {
	Trusted    bool           `json:"trusted"`
	Reason     string         `json:"reason,omitempty"`
	Kind       string         `json:"kind"`
	Fresh      bool           `json:"fresh"`
	Batched    bool           `json:"batched_quote,omitempty"`
	VM         VMReport       `json:"vm"`
	Quote      QuoteReport    `json:"quote"`
	PCR        int            `json:"pcr"`
	PCRValue   string         `json:"pcr_value,omitempty"`
	HostPCRs   []PCRReport    `json:"quoted_pcrs,omitempty"`
	Epoch      EpochReport    `json:"epoch"`
	Batches    int            `json:"batches"`
	LogEntries int            `json:"log_entries"`
	Records    int            `json:"records"`
	Genesis    *GenesisReport `json:"genesis,omitempty"`
	Counts     Counts         `json:"counts"`
	Bindings   []string       `json:"bindings,omitempty"`
	Reboots    []RecordRef    `json:"reboots,omitempty"`
	Actions    []RecordRef    `json:"actions,omitempty"`
	Ended      bool           `json:"ended"`
	Teardown   *RecordRef     `json:"teardown,omitempty"`
	// MigratedTo is the host a VM whose evidence ends with a
	// migrated-out record left for (post-mortem evidence of its last
	// segment on the source).
	MigratedTo string `json:"migrated_to,omitempty"`
	// Segments are the VM's stays on hosts (live migration), oldest
	// first; one for a VM that never moved (chain.go).
	Segments   []SegmentReport `json:"segments,omitempty"`
	Violations []Violation     `json:"violations,omitempty"`
	VTPM       *VTPMReport     `json:"vtpm,omitempty"`
	Checkpoint *Checkpoint     `json:"checkpoint,omitempty"`
	// BoundKeys, Appraisal and Trust: appraise.go.
	BoundKeys []BoundKey   `json:"bound_keys,omitempty"`
	Appraisal *Appraisal   `json:"appraisal,omitempty"`
	Trust     *TrustReport `json:"trust,omitempty"`

	bound map[[32]byte]BoundKey // binding records by key hash
}

// VMReport names the VM instance verified.
type VMReport struct {
	UUID     string `json:"uuid"`
	Instance string `json:"instance"`
	ID       string `json:"id"`
	Name     string `json:"name,omitempty"`
}

// QuoteReport holds the quote's clockInfo and firmware version, as
// reported by the TPM and authenticated by the quote signature.
type QuoteReport struct {
	Clock           uint64 `json:"clock"`
	ResetCount      uint32 `json:"reset_count"`
	RestartCount    uint32 `json:"restart_count"`
	Safe            bool   `json:"safe"`
	FirmwareVersion uint64 `json:"firmware_version"`
}

// PCRReport is one quoted PCR value.
type PCRReport struct {
	Index  int    `json:"index"`
	SHA256 string `json:"sha256"`
}

// EpochReport describes the epoch the log belongs to (from its
// authenticated epoch record).
type EpochReport struct {
	SHA256        string `json:"sha256"` // H(R_epoch): names the epoch
	Host          string `json:"host"`
	BridgeVersion string `json:"bridge_version"`
	Time          int64  `json:"time"`
	Nonce         string `json:"nonce"`
	ResetCount    uint32 `json:"reset_count"`
	RestartCount  uint32 `json:"restart_count"`
	Clock         uint64 `json:"clock"`
	StartValue    string `json:"start_value"`
	// ClearDisabled: TPM2_Clear was disabled when the epoch opened, so
	// this power cycle cannot be replayed by clearing the TPM.
	ClearDisabled bool `json:"clear_disabled"`
}

// GenesisReport is the launch measurement of the VM instance.
type GenesisReport struct {
	Name      string       `json:"name"`
	CID       uint32       `json:"cid,omitempty"`
	DomainXML string       `json:"domain_xml_sha256"`
	Files     []LaunchFile `json:"files,omitempty"`
	Time      int64        `json:"time"`
}

// Counts tallies the VM's records by kind.
type Counts struct {
	Measurements int `json:"measurements"`
	Reboots      int `json:"reboots"`
	Bindings     int `json:"bindings"`
	Actions      int `json:"actions"`
}

// RecordRef points at one record with a short description.
type RecordRef struct {
	Seq    uint64 `json:"seq"`
	G      uint64 `json:"g"`
	Time   int64  `json:"time"`
	Detail string `json:"detail"`
	// Note is an action record's detail (what was done and why).
	Note string `json:"note,omitempty"`
}

// Violation is one measurement the policy does not allow.
type Violation struct {
	Seq    uint64 `json:"seq"`
	Path   string `json:"path"`
	Digest string `json:"digest"`
	Reason string `json:"reason"`
}

// add folds one verified record into the report and applies the per-kind
// rules of step 4 and the appraisal of step 5.
func (rep *Report) add(s, g uint64, rec *record.Record, ident *conceal.Identity, opts Options) error {
	switch rec.Kind {
	case record.KindGenesis:
		if s != 0 {
			return reject(4, "record %d is a second genesis record", s)
		}
		gen := rec.Genesis
		if gen.UUID != ident.UUID {
			return reject(4, "genesis record is for uuid %s, expected %s", conceal.FormatUUID(gen.UUID), conceal.FormatUUID(ident.UUID))
		}
		if gen.Instance != ident.Instance {
			return reject(4, "genesis record is for instance %x, expected %x", gen.Instance, ident.Instance)
		}
		rep.VM.Name = gen.Name
		rep.Genesis = &GenesisReport{Name: gen.Name, CID: gen.CID, DomainXML: hex.EncodeToString(gen.DomainXML[:]), Files: launchFiles(gen.Files), Time: rec.Time}
		if opts.Appraiser != nil {
			rep.Violations = append(rep.Violations, opts.Appraiser.AppraiseGenesis(gen)...)
		}
		return nil
	}
	if s == 0 {
		return reject(4, "record 0 is a %s record, not genesis", rec.Kind)
	}
	ref := RecordRef{Seq: s, G: g, Time: rec.Time}
	switch rec.Kind {
	case record.KindMeasurement:
		rep.Counts.Measurements++
		m := rec.Measurement
		if err := m.CheckTemplateHash(); err != nil {
			return reject(4, "record %d: %v", s, err)
		}
		if opts.Appraise != nil {
			for _, v := range opts.Appraise(m) {
				v.Seq = s
				rep.Violations = append(rep.Violations, v)
			}
		}
		if opts.Appraiser != nil {
			for _, v := range opts.Appraiser.AppraiseMeasurement(s, m) {
				v.Seq = s
				rep.Violations = append(rep.Violations, v)
			}
		}
	case record.KindReboot:
		rep.Counts.Reboots++
		ref.Detail = rec.Reboot.Reason
		rep.Reboots = append(rep.Reboots, ref)
	case record.KindBinding:
		rep.Counts.Bindings++
		rep.Bindings = append(rep.Bindings, hex.EncodeToString(rec.Binding.KeyHash[:]))
		rep.bindingAt(s, rec.Binding)
	case record.KindAction:
		rep.Counts.Actions++
		ref.Detail, ref.Note = rec.Action.Action, rec.Action.Detail
		rep.Actions = append(rep.Actions, ref)
	case record.KindTeardown:
		ref.Detail = rec.Teardown.Reason
		rep.Teardown = &ref
		rep.Ended = true
	case record.KindMigratedIn:
		rep.MigratedTo = ""
		if aa, ok := opts.Appraiser.(ArrivalAppraiser); ok {
			rep.Violations = append(rep.Violations, aa.AppraiseArrival(s, rec.MigratedIn)...)
		}
	case record.KindMigratedOut:
		rep.MigratedTo = rec.MigratedOut.DestHost
	}
	return nil
}
