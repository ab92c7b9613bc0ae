// Package policy appraises guest IMA measurements against a tenant's
// runtime policy in Keylime's runtime-policy JSON format (meta, release,
// digests, excludes, keyrings, ima, ima-buf, verification-keys), so policies
// tenants already keep for Keylime work unchanged.
package policy

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// MaxSize bounds a policy file.
const MaxSize = 256 << 20

// Runtime is a Keylime runtime policy.
type Runtime struct {
	Meta     map[string]any      `json:"meta"`
	Release  json.RawMessage     `json:"release,omitempty"`
	Digests  map[string][]string `json:"digests"`
	Excludes []string            `json:"excludes"`
	Keyrings map[string][]string `json:"keyrings"`
	IMA      struct {
		IgnoredKeyrings []string `json:"ignored_keyrings"`
		LogHashAlg      string   `json:"log_hash_alg"`
		DMPolicy        any      `json:"dm_policy"`
	} `json:"ima"`
	IMABuf           map[string][]string `json:"ima-buf"`
	VerificationKeys any                 `json:"verification-keys"`

	excludes []*regexp.Regexp
	allowed  map[string]map[string]bool // path -> lower-case hex digests
}

// Parse reads a runtime policy and compiles its excludes.
func Parse(b []byte) (*Runtime, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("policy of %d bytes exceeds %d", len(b), MaxSize)
	}
	var p Runtime
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("parse runtime policy: %w", err)
	}
	if p.Digests == nil {
		return nil, fmt.Errorf("parse runtime policy: no \"digests\" object")
	}
	for _, ex := range p.Excludes {
		re, err := regexp.Compile(ex)
		if err != nil {
			return nil, fmt.Errorf("parse runtime policy: exclude %q: %w", ex, err)
		}
		p.excludes = append(p.excludes, re)
	}
	p.allowed = make(map[string]map[string]bool, len(p.Digests))
	for path, ds := range p.Digests {
		set := make(map[string]bool, len(ds))
		for _, d := range ds {
			d = strings.ToLower(d)
			if _, err := hex.DecodeString(d); err != nil {
				return nil, fmt.Errorf("parse runtime policy: digest %q of %s is not hex", d, path)
			}
			set[d] = true
		}
		p.allowed[path] = set
	}
	return &p, nil
}

// Appraise checks one measurement record (step 5 of verification) and
// returns its violations: a path the policy does not list, or a digest the
// policy does not allow for it. Excluded paths are accepted.
func (p *Runtime) Appraise(m *record.Measurement) []verify.Violation {
	f, err := ima.DecodeTemplate(m.Template, m.TemplateData)
	if err != nil {
		return []verify.Violation{{Reason: fmt.Sprintf("undecodable %s template data: %v", m.Template, err)}}
	}
	digest := hex.EncodeToString(f.Digest)
	if m.Template == "ima-buf" {
		set, ok := p.IMABuf[f.Path]
		if !ok {
			return nil // Keylime appraises only the ima-buf names it lists
		}
		for _, d := range set {
			if strings.EqualFold(d, digest) {
				return nil
			}
		}
		return []verify.Violation{{Path: f.Path, Digest: f.DigestAlg + ":" + digest, Reason: "buffer digest not allowed by ima-buf"}}
	}
	for _, re := range p.excludes {
		if re.MatchString(f.Path) {
			return nil
		}
	}
	if isZero(f.Digest) {
		return []verify.Violation{{Path: f.Path, Digest: f.DigestAlg + ":" + digest, Reason: "IMA violation entry (file changed while measured, or open for write)"}}
	}
	set, ok := p.allowed[f.Path]
	if !ok {
		return []verify.Violation{{Path: f.Path, Digest: f.DigestAlg + ":" + digest, Reason: "path not in policy"}}
	}
	if !set[digest] {
		return []verify.Violation{{Path: f.Path, Digest: f.DigestAlg + ":" + digest, Reason: "digest not allowed for this path"}}
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return len(b) > 0
}
