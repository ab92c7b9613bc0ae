// Package policy appraises a VM's records against a tenant's runtime policy
// in Keylime's runtime-policy JSON format (meta, release, digests,
// excludes, keyrings, ima.ignored_keyrings, ima.log_hash_alg, ima.dm_policy,
// ima-buf, verification-keys), so policies tenants already keep for
// Keylime work unchanged and give the verdicts Keylime gives, and against
// an optional "tpmmux" section that pins the VM's launch measurement
// (launch.go). Keylime's schema does not forbid additional top-level keys,
// so a policy with a tpmmux section still loads in Keylime.
//
// The appraisal follows keylime/ima/ima.py (Keylime 7.x):
//
//   - excludes are regular expressions matched at the start of the path
//     (Python re.match on "(ex1)|(ex2)|…"); here compiled as RE2, so Python-
//     only constructs (look-arounds, backreferences) are refused at Parse;
//   - ima-ng and legacy ima entries: excluded, else the path must be in
//     digests and the file digest (hex) among its values;
//   - ima-sig entries: excluded, or the signature verifies with a key of
//     the tenant's keyring (verification-keys, or keys given to New) or one
//     the guest loaded onto a keyring the policy allows; otherwise as
//     ima-ng;
//   - ima-buf entries that carry a key: unless the keyring is in
//     ima.ignored_keyrings (or "*"), the buffer digest must be in
//     keyrings[keyring name], and then the key joins that keyring for
//     later signature checks; other ima-buf entries (e.g. kexec-cmdline)
//     must be in ima-buf like files in digests;
//   - entries whose template hash is all zeros (IMA's time-of-measure/
//     time-of-use and open-writers violations) are skipped, as Keylime
//     does by default (its verifier option ignore_tomtou_errors), and
//     listed as ignored; "tpmmux": {"tomtou": "reject"} makes them
//     violations;
//   - an entry for another PCR than 10 is a violation, and so is one whose
//     template hash algorithm is not ima.log_hash_alg;
//   - ima.dm_policy must be null (Keylime's current schema requires it).
//
// One difference is forced by the design: Keylime adds the boot aggregate
// it computes from the quoted PCRs 0-9 to digests["boot_aggregate"]. A
// tpmmux guest's PCRs are not in the evidence (the host's TPM quotes the
// host's PCRs), so the kernel's own boot_aggregate entry (the first of a boot:
// guest log index 0, unsigned; a later entry of that name is a file a guest
// user named so) is appraised only when the policy
// lists it, and otherwise skipped with a note; the genesis record's launch
// measurement, pinned by the tpmmux section, is what vouches for the
// guest's boot.
package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// MaxSize bounds a policy file.
const MaxSize = 256 << 20

// IMAPCR is the PCR guest IMA measures into (Keylime's IMA_PCR).
const IMAPCR = 10

// Runtime is a Keylime runtime policy.
type Runtime struct {
	Meta     map[string]any      `json:"meta"`
	Release  json.RawMessage     `json:"release,omitempty"`
	Digests  map[string][]string `json:"digests"`
	Excludes []string            `json:"excludes"`
	Keyrings map[string][]string `json:"keyrings"`
	IMA      struct {
		IgnoredKeyrings []string        `json:"ignored_keyrings"`
		LogHashAlg      string          `json:"log_hash_alg"`
		DMPolicy        json.RawMessage `json:"dm_policy"`
	} `json:"ima"`
	IMABuf map[string][]string `json:"ima-buf"`
	// VerificationKeys is Keylime's tenant keyring: a string holding the
	// JSON {"meta": {"version": 1}, "keyids": [...], "pubkeys": [base64
	// DER SubjectPublicKeyInfo, ...]}.
	VerificationKeys json.RawMessage `json:"verification-keys"`
	// TPMMux is the tpmmux section (launch.go); Keylime ignores it.
	TPMMux *Extension `json:"-"`

	// Sum is the SHA-256 of the policy file.
	Sum [32]byte `json:"-"`

	exclude  *regexp.Regexp
	digests  map[string]map[string]bool
	keyrings map[string]map[string]bool
	imaBuf   map[string]map[string]bool
	ignored  map[string]bool
	tenant   []Key
}

// Parse reads a runtime policy: it checks what Keylime's schema checks
// (digests are hex, ima.log_hash_alg one of sha1, sha256, sha384, sha512,
// dm_policy null, verification-keys a keyring) and compiles the excludes.
func Parse(b []byte) (*Runtime, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("policy of %d bytes exceeds %d", len(b), MaxSize)
	}
	var p Runtime
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("parse runtime policy: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parse runtime policy: more than one JSON value")
	}
	if p.Digests == nil {
		return nil, errors.New("parse runtime policy: no \"digests\" object")
	}
	if payload := dssePayload(b); payload {
		return nil, errors.New("parse runtime policy: this is a DSSE envelope: verify it and pass its payload")
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, fmt.Errorf("parse runtime policy: %w", err)
	}
	if raw, ok := top["tpmmux"]; ok {
		ext, err := parseExtension(raw)
		if err != nil {
			return nil, fmt.Errorf("parse runtime policy: tpmmux: %w", err)
		}
		p.TPMMux = ext
	}
	p.Sum = sha256.Sum256(b)
	if len(p.Excludes) > 0 {
		parts := make([]string, len(p.Excludes))
		for i, ex := range p.Excludes {
			if _, err := regexp.Compile(ex); err != nil {
				return nil, fmt.Errorf("parse runtime policy: exclude %q is not a regular expression this verifier (RE2) accepts: %w", ex, err)
			}
			parts[i] = "(?:" + ex + ")"
		}
		// Keylime: re.compile("(" + ")|(".join(excludes) + ")").match(path)
		// matches at the start of the path only.
		re, err := regexp.Compile("^(?:" + strings.Join(parts, "|") + ")")
		if err != nil {
			return nil, fmt.Errorf("parse runtime policy: excludes: %w", err)
		}
		p.exclude = re
	}
	var err error
	if p.digests, err = digestSets("digests", p.Digests); err != nil {
		return nil, err
	}
	if p.keyrings, err = digestSets("keyrings", p.Keyrings); err != nil {
		return nil, err
	}
	if p.imaBuf, err = digestSets("ima-buf", p.IMABuf); err != nil {
		return nil, err
	}
	switch p.IMA.LogHashAlg {
	case "", "sha1", "sha256", "sha384", "sha512":
	default:
		return nil, fmt.Errorf("parse runtime policy: ima.log_hash_alg %q, want sha1, sha256, sha384 or sha512", p.IMA.LogHashAlg)
	}
	if dm := bytes.TrimSpace(p.IMA.DMPolicy); len(dm) > 0 && !bytes.Equal(dm, []byte("null")) {
		return nil, errors.New("parse runtime policy: ima.dm_policy is not supported (Keylime's schema requires null)")
	}
	p.ignored = make(map[string]bool, len(p.IMA.IgnoredKeyrings))
	for _, k := range p.IMA.IgnoredKeyrings {
		p.ignored[k] = true
	}
	if p.tenant, err = parseVerificationKeys(p.VerificationKeys); err != nil {
		return nil, fmt.Errorf("parse runtime policy: verification-keys: %w", err)
	}
	return &p, nil
}

// dssePayload reports whether b is a DSSE envelope (a signed Keylime
// policy), which has a payload instead of the policy's keys.
func dssePayload(b []byte) bool {
	var env struct {
		Payload     string `json:"payload"`
		PayloadType string `json:"payloadType"`
	}
	return json.Unmarshal(b, &env) == nil && env.Payload != "" && env.PayloadType != ""
}

func digestSets(what string, m map[string][]string) (map[string]map[string]bool, error) {
	out := make(map[string]map[string]bool, len(m))
	for path, ds := range m {
		set := make(map[string]bool, len(ds))
		for _, d := range ds {
			d = strings.ToLower(d)
			if _, err := hex.DecodeString(d); err != nil || d == "" {
				// Old Keylime policies may hold "alg:hex" (e.g. for
				// boot_aggregate); Keylime loads them and they never
				// match a hex digest: so here.
				alg, h, ok := strings.Cut(d, ":")
				if _, herr := hex.DecodeString(h); !ok || alg == "" || h == "" || herr != nil {
					return nil, fmt.Errorf("parse runtime policy: %s: digest %q of %s is not hex", what, d, path)
				}
			}
			set[d] = true
		}
		out[path] = set
	}
	return out, nil
}

// Appraise checks one measurement record on its own (no keys learned from
// earlier entries); New gives the full, stateful appraisal.
func (p *Runtime) Appraise(m *record.Measurement) []verify.Violation {
	return New(p, nil).AppraiseMeasurement(0, m)
}

// Appraisal appraises one VM's records in order (verify.Appraiser): it
// learns the keys the guest loads onto keyrings the policy allows, as
// Keylime does, and accounts for what it checked (Report).
type Appraisal struct {
	rt      *Runtime
	launch  *LaunchPolicy
	reject  bool           // tomtou: reject
	tenant  map[uint32]Key // tenant keyring
	learned map[string]map[uint32]Key
	rep     verify.Appraisal
	sigs    verify.Signatures
}

var _ verify.Appraiser = (*Appraisal)(nil)

// New starts the appraisal of one VM against rt (nil: launch only, from
// the launch policy in rt's tpmmux section or set with WithLaunch) with
// extra verification keys (e.g. --ima-keys) besides the policy's own.
func New(rt *Runtime, keys []Key) *Appraisal {
	a := &Appraisal{rt: rt, tenant: map[uint32]Key{}, learned: map[string]map[uint32]Key{}}
	if rt != nil {
		a.rep.Policy = hex.EncodeToString(rt.Sum[:])
		a.rep.LogHashAlg = rt.IMA.LogHashAlg
		for _, k := range rt.tenant {
			a.tenant[k.ID] = k
		}
		if rt.TPMMux != nil {
			a.launch = rt.TPMMux.Launch
			a.reject = rt.TPMMux.ToMToU == ToMToUReject
		}
	}
	for _, k := range keys {
		a.tenant[k.ID] = k
	}
	a.sigs.Keys = []string{}
	for id := range a.tenant {
		a.sigs.Keys = append(a.sigs.Keys, fmt.Sprintf("%08x", id))
	}
	slices.Sort(a.sigs.Keys)
	return a
}

// WithLaunch sets (or replaces) the launch policy.
func (a *Appraisal) WithLaunch(l *LaunchPolicy) *Appraisal {
	a.launch = l
	return a
}

// Report is the account of the appraisal so far.
func (a *Appraisal) Report() *verify.Appraisal {
	r := a.rep
	s := a.sigs
	r.Signatures = &s
	return &r
}

func viol(f *ima.Fields, reason string) []verify.Violation {
	return []verify.Violation{{Path: f.Path, Digest: f.DigestAlg + ":" + hex.EncodeToString(f.Digest), Reason: reason}}
}

// AppraiseMeasurement implements verify.Appraiser.
func (a *Appraisal) AppraiseMeasurement(seq uint64, m *record.Measurement) []verify.Violation {
	if a.rt == nil {
		return nil // launch only
	}
	f, err := ima.DecodeTemplate(m.Template, m.TemplateData)
	if err != nil {
		return []verify.Violation{{Reason: fmt.Sprintf("undecodable %s template data: %v", m.Template, err)}}
	}
	if m.PCR != IMAPCR {
		return viol(&f, fmt.Sprintf("IMA entry for PCR %d, not %d", m.PCR, IMAPCR))
	}
	if isZero(m.TemplateHash) {
		v := viol(&f, "time-of-measure/time-of-use or open-writers violation entry (IMA could not measure the file)")
		if a.reject {
			return v
		}
		v[0].Seq = seq
		v[0].Reason += ": skipped, as Keylime does by default (tpmmux.tomtou: reject makes it a violation)"
		a.rep.Ignored = append(a.rep.Ignored, v[0])
		return nil
	}
	if alg := a.rt.IMA.LogHashAlg; alg != "" && m.TemplateHashAlg != alg {
		return viol(&f, fmt.Sprintf("template hash is %s but the policy's ima.log_hash_alg is %s", m.TemplateHashAlg, alg))
	}
	switch {
	case m.Template == "ima-buf" || (len(f.Buf) > 0 && len(f.Sig) == 0):
		return a.buf(&f)
	case len(f.Sig) > 0:
		if a.signature(seq, m, &f) && (a.rt.exclude == nil || !a.rt.exclude.MatchString(f.Path)) {
			a.rep.Appraised++
			return nil
		}
	}
	return a.file(&f, genuineBootAggregate(m, &f))
}

// genuineBootAggregate says whether an entry named boot_aggregate is the
// kernel's own: the first entry of a boot (guest log index 0), unsigned, of
// a template that carries it. IMA records a bare file name when a path is
// too long or unreachable, so a guest user can make any later entry say
// "boot_aggregate"; only the genuine one is skipped unappraised.
func genuineBootAggregate(m *record.Measurement, f *ima.Fields) bool {
	switch m.Template {
	case "ima", "ima-ng", "ima-sig":
	default:
		return false
	}
	return f.Path == "boot_aggregate" && m.LogIndex == 0 && len(f.Sig) == 0
}

// file is Keylime's _validate_ima_ng over digests; bootAggregate marks the
// kernel's own boot_aggregate entry.
func (a *Appraisal) file(f *ima.Fields, bootAggregate bool) []verify.Violation {
	if a.excluded(f.Path) {
		return nil
	}
	set, ok := a.rt.digests[f.Path]
	if !ok {
		if bootAggregate {
			v := viol(f, "boot_aggregate not appraised: the policy does not list it, and the guest's PCRs 0-9 are not in tpmmux evidence (the launch measurement pins the boot)")
			a.rep.Ignored = append(a.rep.Ignored, v[0])
			return nil
		}
		a.rep.Appraised++
		return viol(f, "path not in policy")
	}
	a.rep.Appraised++
	if !set[hex.EncodeToString(f.Digest)] {
		return viol(f, "digest not allowed for this path")
	}
	return nil
}

func (a *Appraisal) excluded(path string) bool {
	if a.rt.exclude != nil && a.rt.exclude.MatchString(path) {
		a.rep.Excluded++
		return true
	}
	return false
}

// buf is Keylime's _validate_ima_buf: a key measured onto a keyring, or a
// generic buffer (kexec-cmdline, …) appraised against ima-buf.
func (a *Appraisal) buf(f *ima.Fields) []verify.Violation {
	key, isKey, err := keyFromBuffer(f.Buf)
	if err != nil {
		return viol(f, fmt.Sprintf("key on keyring %s is not a supported key: %v", f.Path, err))
	}
	if !isKey {
		v, _ := a.listed(f, a.rt.imaBuf, "buffer name not in the policy's ima-buf", "buffer digest not allowed by ima-buf")
		return v
	}
	if a.rt.ignored["*"] || a.rt.ignored[f.Path] {
		v := viol(f, "key on an ignored keyring (ima.ignored_keyrings): not appraised, not used")
		a.rep.Ignored = append(a.rep.Ignored, v[0])
		return nil
	}
	if v, ok := a.listed(f, a.rt.keyrings, "keyring not in the policy's keyrings", "key not allowed on this keyring by the policy's keyrings"); !ok {
		return v
	}
	ring := a.learned[f.Path]
	if ring == nil {
		ring = map[uint32]Key{}
		a.learned[f.Path] = ring
	}
	ring[key.ID] = key
	if id := fmt.Sprintf("%08x", key.ID); !slices.Contains(a.sigs.Keys, id) {
		a.sigs.Keys = append(a.sigs.Keys, id)
	}
	return nil
}

// listed appraises a buffer against one of the policy's name -> digests
// sections (ima-buf, keyrings): unless its name is excluded it counts as
// appraised, and a name or a digest the section lacks is a violation. ok
// is true only when it was appraised and allowed.
func (a *Appraisal) listed(f *ima.Fields, section map[string]map[string]bool, noName, noDigest string) (v []verify.Violation, ok bool) {
	if a.excluded(f.Path) {
		return nil, false
	}
	a.rep.Appraised++
	set, found := section[f.Path]
	if !found {
		return viol(f, noName), false
	}
	if !set[hex.EncodeToString(f.Digest)] {
		return viol(f, noDigest), false
	}
	return nil, true
}

// signature checks an entry's IMA signature against the known keys and
// records what it found; it reports whether the signature verified, which
// settles the entry (otherwise it is appraised like an ima-ng entry).
func (a *Appraisal) signature(seq uint64, m *record.Measurement, f *ima.Fields) bool {
	a.sigs.Signed++
	e := verify.SignatureEntry{Seq: seq, LogIndex: m.LogIndex, Path: f.Path}
	st, keyID, alg := verifySignature(f.Sig, f.Digest, f.DigestAlg, a.lookup)
	e.Status, e.HashAlg = st, alg
	if keyID != nil {
		e.KeyID = fmt.Sprintf("%08x", *keyID)
	}
	if st == StatusVerified {
		a.sigs.Verified++
	} else {
		a.sigs.Unverified++
	}
	a.sigs.Entries = append(a.sigs.Entries, e)
	return st == StatusVerified
}

func (a *Appraisal) lookup(id uint32) (Key, bool) {
	if k, ok := a.tenant[id]; ok {
		return k, true
	}
	for _, ring := range a.learned {
		if k, ok := ring[id]; ok {
			return k, true
		}
	}
	return Key{}, false
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return len(b) > 0
}
