package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The shipped configuration still loads, and the migration block is
// decoded strictly with errors that name the fix.
func TestMigrationConfig(t *testing.T) {
	if _, err := LoadConfig("../../scripts/etc/bridge.json", false); err != nil {
		t.Fatalf("scripts/etc/bridge.json: %v", err)
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		json, want string
	}{
		{`{"migration": {"listen": "127.0.0.1:7710", "ek_ca": "/etc/tpmmux/ek-ca.pem", "peers": [{"name": "hostb", "address": "127.0.0.1:7711", "tls_sha256": "` + strings.Repeat("ab", 32) + `", "enrolled": "/etc/tpmmux/peers/hostb.json"}]}}`, ""},
		// A destination-only peer has no address.
		{`{"migration": {"listen": "127.0.0.1:7710", "ek_ca": "c", "peers": [{"name": "hostb", "tls_sha256": "` + strings.Repeat("ab", 32) + `", "enrolled": "e"}]}}`, ""},
		{`{"migration": {"listen": "127.0.0.1:7710", "ek_ca": "c", "peers": [{"name": "hostb", "tls_sha256": "` + strings.Repeat("ab", 32) + `"}]}}`, "enrolled are required"},
		{`{"migration": {"listen": "127.0.0.1:7710", "peers": [{"name": "hostb", "address": "x:1", "tls_sha": "00", "enrolled": "e"}]}}`, `unknown field "tls_sha"`},
		{`{"migration": {"listen": "127.0.0.1:7710", "peers": [{"name": "hostb", "address": "x:1", "tls_sha256": "00", "enrolled": "e"}]}}`, "ek_ca is required"},
		{`{"migration": {"listen": "x:1", "ek_ca": "c", "peers": [{"name": "hostb", "address": "x:1", "tls_sha256": "00", "enrolled": "e"}]}}`, "not 64 hex digits"},
		{`{"migration": {"listen": "x:1", "cert": "c.pem"}}`, "both cert and key"},
		{`{"migration": {"listen": "x:1", "handover_timeout": "soon"}}`, "handover_timeout"},
		{`{"migration": {"lisen": "x:1"}}`, "lisen"},
	} {
		p := filepath.Join(dir, "bridge.json")
		if err := os.WriteFile(p, []byte(tc.json), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p, false)
		if err == nil {
			_, err = cfg.parse()
		}
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.json, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.json, err, tc.want)
		}
	}
}
