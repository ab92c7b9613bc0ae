package policy

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// Extension is the "tpmmux" section of a runtime policy file (Keylime
// ignores keys it does not know):
//
//	"tpmmux": {
//	  "launch": {
//	    "domain_xml_sha256": ["<hex>", ...],
//	    "files": {"kernel": ["<hex>"], "initrd": ["<hex>"], "loader": [...], "nvram": [...]},
//	    "vpcrs": {"sha256": {"0": ["<hex>"], "4": ["<hex>"]}, "sha1": {...}}
//	  },
//	  "tomtou": "ignore" | "reject"
//	}
//
// Unknown keys in it are an error (it is tpmmux's own format).
type Extension struct {
	Launch *LaunchPolicy `json:"launch,omitempty"`
	// ToMToU is what to do with IMA's violation entries (all-zero template
	// hash): "ignore" (default, as Keylime) or "reject".
	ToMToU string `json:"tomtou,omitempty"`
}

// The tomtou settings.
const (
	ToMToUIgnore = "ignore"
	ToMToUReject = "reject"
)

// LaunchPolicy pins the launch measurement the bridge records in a VM's
// genesis record: the SHA-256 of the domain XML and of the files it names
// by role (kernel, initrd, loader, nvram). Each list holds the allowed
// digests; an absent or empty list leaves that item unchecked. A role the
// policy pins must be in the launch, measured, with an allowed digest.
type LaunchPolicy struct {
	DomainXML Digests            `json:"domain_xml_sha256,omitempty"`
	Files     map[string]Digests `json:"files,omitempty"`
	// VPCRs pins a vTPM VM's measured boot: by bank ("sha1", "sha256",
	// …), by PCR index 0-9, the allowed values of the virtual PCR (its
	// firmware and boot loader extends), as the verifier replays them.
	VPCRs map[string]map[string][]string `json:"vpcrs,omitempty"`
}

// Digests is a list of SHA-256 digests in hex; a single string is taken
// as a list of one.
type Digests []string

// UnmarshalJSON reads a hex string or a list of them, lower-cased.
func (d *Digests) UnmarshalJSON(b []byte) error {
	var list []string
	if len(bytes.TrimSpace(b)) > 0 && bytes.TrimSpace(b)[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		list = []string{s}
	} else if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("want a sha256 hex digest or a list of them: %w", err)
	}
	for i, s := range list {
		s = strings.ToLower(strings.TrimSpace(s))
		if v, err := hex.DecodeString(s); err != nil || len(v) != 32 {
			return fmt.Errorf("%q is not a sha256 hex digest", s)
		}
		list[i] = s
	}
	*d = list
	return nil
}

// The launch file roles the bridge records (libvirt.LaunchFile).
var launchRoles = []string{"kernel", "initrd", "loader", "nvram"}

func parseExtension(raw []byte) (*Extension, error) {
	var e Extension
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		return nil, err
	}
	switch e.ToMToU {
	case "", ToMToUIgnore, ToMToUReject:
	default:
		return nil, fmt.Errorf("tomtou %q, want %s or %s", e.ToMToU, ToMToUIgnore, ToMToUReject)
	}
	if e.Launch != nil {
		for role := range e.Launch.Files {
			if !slices.Contains(launchRoles, role) {
				return nil, fmt.Errorf("launch.files: unknown role %q (want %s)", role, strings.Join(launchRoles, ", "))
			}
		}
		if err := e.Launch.checkVPCRs(); err != nil {
			return nil, err
		}
	}
	return &e, nil
}

// ParseLaunch reads a launch policy file (--launch-policy): a runtime
// policy with a tpmmux section, the tpmmux section itself, or just its
// launch object.
func ParseLaunch(b []byte) (*Extension, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("launch policy of %d bytes exceeds %d", len(b), MaxSize)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, fmt.Errorf("parse launch policy: %w", err)
	}
	if raw, ok := top["tpmmux"]; ok {
		return parseExtension(raw)
	}
	if _, ok := top["launch"]; ok {
		return parseExtension(b)
	}
	l, err := parseExtension([]byte(`{"launch":` + string(b) + `}`))
	if err != nil {
		return nil, fmt.Errorf("parse launch policy: %w", err)
	}
	if l.Launch == nil || (len(l.Launch.DomainXML) == 0 && len(l.Launch.Files) == 0 && len(l.Launch.VPCRs) == 0) {
		return nil, errors.New("parse launch policy: it pins nothing (want domain_xml_sha256, files or vpcrs)")
	}
	return l, nil
}

// AppraiseGenesis implements verify.Appraiser: the launch measurement
// against the launch policy.
func (a *Appraisal) AppraiseGenesis(g *record.Genesis) []verify.Violation {
	return a.appraiseLaunch(g.DomainXML, g.Files, "launch:")
}

// AppraiseArrival implements verify.ArrivalAppraiser: a VM that migrated
// in was started on its new host from the domain XML and files its
// migrated-in record measured, and they answer to the same launch policy
// as the genesis's (a host that migrates the VM may not swap its kernel).
// Violations name the host, e.g. "launch@hostb:kernel:/boot/vmlinuz".
func (a *Appraisal) AppraiseArrival(seq uint64, in *record.MigratedIn) []verify.Violation {
	out := a.appraiseLaunch(in.DomainXML, in.Files, "launch@"+in.Host+":")
	for i := range out {
		out[i].Seq = seq
	}
	return out
}

// appraiseLaunch checks one launch measurement (a genesis's or a
// migrated-in record's) against the launch policy; the report's launch
// section accumulates over all of a VM's launches.
func (a *Appraisal) appraiseLaunch(domainXML [32]byte, files []record.File, prefix string) []verify.Violation {
	l := a.launch
	if l == nil {
		return nil
	}
	rep := a.rep.Launch
	if rep == nil {
		rep = &verify.Launch{OK: true}
		a.rep.Launch = rep
	}
	checked := func(what string) {
		if !slices.Contains(rep.Checked, what) {
			rep.Checked = append(rep.Checked, what)
		}
	}
	var out []verify.Violation
	if len(l.DomainXML) > 0 {
		checked("domain_xml")
		d := hex.EncodeToString(domainXML[:])
		if !slices.Contains(l.DomainXML, d) {
			out = append(out, verify.Violation{Path: prefix + "domain_xml", Digest: "sha256:" + d, Reason: "domain XML digest not allowed by the launch policy"})
		}
	}
	roles := make([]string, 0, len(l.Files))
	for role := range l.Files {
		roles = append(roles, role)
	}
	slices.Sort(roles)
	for _, role := range roles {
		allowed := l.Files[role]
		if len(allowed) == 0 {
			continue
		}
		checked(role)
		found := false
		for _, f := range files {
			if f.Role != role {
				continue
			}
			found = true
			path := prefix + role + ":" + f.Path
			switch {
			case len(f.SHA256) == 0:
				out = append(out, verify.Violation{Path: path, Reason: "launch file was not measured: " + f.Error})
			case !slices.Contains(allowed, hex.EncodeToString(f.SHA256)):
				out = append(out, verify.Violation{Path: path, Digest: "sha256:" + hex.EncodeToString(f.SHA256), Reason: role + " digest not allowed by the launch policy"})
			}
		}
		if !found {
			out = append(out, verify.Violation{Path: prefix + role, Reason: "the launch policy pins a " + role + " but the launch has none"})
		}
	}
	if len(out) > 0 {
		rep.OK = false
	}
	return out
}

// checkVPCRs validates the vpcrs pins: known banks, PCRs 0-9, digests of
// the bank's size in hex (lower-cased).
func (l *LaunchPolicy) checkVPCRs() error {
	for bank, pcrs := range l.VPCRs {
		a, err := vpcr.ParseAlg(bank)
		if err != nil {
			return fmt.Errorf("launch.vpcrs: %w", err)
		}
		for idx, vals := range pcrs {
			i, err := strconv.Atoi(idx)
			if err != nil || i < 0 || i > 9 {
				return fmt.Errorf("launch.vpcrs.%s: %q is not a PCR of 0-9 (the measured boot)", bank, idx)
			}
			for k, v := range vals {
				v = strings.ToLower(strings.TrimSpace(v))
				if b, err := hex.DecodeString(v); err != nil || len(b) != a.Size() {
					return fmt.Errorf("launch.vpcrs.%s.%s: %q is not a %s value in hex", bank, idx, vals[k], bank)
				}
				vals[k] = v
			}
		}
	}
	return nil
}

// AppraiseVPCRs implements verify.VPCRAppraiser: a vTPM VM's replayed
// vPCRs 0-9 against the launch policy's pins. A VM without a vTPM (r nil)
// fails every pin: its measured boot is not anchored.
func (a *Appraisal) AppraiseVPCRs(r *verify.VTPMReport) []verify.Violation {
	l := a.launch
	if l == nil || len(l.VPCRs) == 0 {
		return nil
	}
	if a.rep.Launch == nil {
		a.rep.Launch = &verify.Launch{OK: true}
	}
	var out []verify.Violation
	banks := make([]string, 0, len(l.VPCRs))
	for b := range l.VPCRs {
		banks = append(banks, b)
	}
	slices.Sort(banks)
	for _, bank := range banks {
		idxs := make([]string, 0, len(l.VPCRs[bank]))
		for i := range l.VPCRs[bank] {
			idxs = append(idxs, i)
		}
		slices.Sort(idxs)
		for _, idx := range idxs {
			path := "vpcr:" + bank + ":" + idx
			a.rep.Launch.Checked = append(a.rep.Launch.Checked, path)
			i, _ := strconv.Atoi(idx)
			var got string
			if r != nil && i < len(r.PCRs[strings.ToLower(bank)]) {
				got = r.PCRs[strings.ToLower(bank)][i]
			}
			switch {
			case r == nil:
				out = append(out, verify.Violation{Path: path, Reason: "the launch policy pins vPCRs but the VM has no bridge-served vTPM"})
			case got == "":
				out = append(out, verify.Violation{Path: path, Reason: "the VM's vTPM has no " + bank + " bank"})
			case !slices.Contains(l.VPCRs[bank][idx], got):
				out = append(out, verify.Violation{Path: path, Digest: bank + ":" + got, Reason: "vPCR value not allowed by the launch policy"})
			}
		}
	}
	if len(out) > 0 {
		a.rep.Launch.OK = false
	}
	return out
}
