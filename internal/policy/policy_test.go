package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
)

func meas(path string, content string) *record.Measurement {
	d := sha256.Sum256([]byte(content))
	e := ima.NewIMANG(10, "sha256", d[:], path)
	return &record.Measurement{PCR: 10, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName, TemplateData: e.TemplateData}
}

func digestOf(s string) string {
	d := sha256.Sum256([]byte(s))
	return hex.EncodeToString(d[:])
}

// keylimePolicy is a runtime policy in the shape keylime_create_policy
// writes.
var keylimePolicy = `{
  "meta": {"version": 1, "generator": 1, "timestamp": "2026-11-29 10:00:00"},
  "release": 0,
  "digests": {
    "/usr/bin/bash": ["` + digestOf("bash") + `"],
    "/usr/bin/ls": ["` + strings.ToUpper(digestOf("ls")) + `", "` + digestOf("ls-old") + `"]
  },
  "excludes": ["^/tmp/.*", "^/var/log/"],
  "keyrings": {},
  "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null},
  "ima-buf": {},
  "verification-keys": ""
}`

func TestAppraise(t *testing.T) {
	p, err := Parse([]byte(keylimePolicy))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		m      *record.Measurement
		reason string
	}{
		{"allowed", meas("/usr/bin/bash", "bash"), ""},
		{"allowed second digest, upper-case in policy", meas("/usr/bin/ls", "ls"), ""},
		{"old digest also allowed", meas("/usr/bin/ls", "ls-old"), ""},
		{"excluded path", meas("/tmp/x", "anything"), ""},
		{"wrong digest", meas("/usr/bin/bash", "trojan"), "digest not allowed for this path"},
		{"unknown path", meas("/usr/bin/nc", "nc"), "path not in policy"},
		{"garbage template data", &record.Measurement{Template: "ima-ng", TemplateData: []byte{1, 2, 3}}, "undecodable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := p.Appraise(tt.m)
			if tt.reason == "" {
				if len(v) != 0 {
					t.Fatalf("violations %+v", v)
				}
				return
			}
			if len(v) != 1 || !strings.Contains(v[0].Reason, tt.reason) {
				t.Fatalf("violations %+v, want %q", v, tt.reason)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	for _, doc := range []string{`{`, `{"digests": {"/x": ["zz"]}}`, `{"digests": {}, "excludes": ["("]}`, `{}`} {
		if _, err := Parse([]byte(doc)); err == nil {
			t.Errorf("accepted %s", doc)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(keylimePolicy))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			return
		}
		p.Appraise(meas("/usr/bin/bash", "bash"))
	})
}
