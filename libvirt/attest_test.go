package libvirt

import "testing"

// TestAttested is the whole opt-in/opt-out rule, which the hook and the
// bridge both apply: every mode against every metadata choice.
func TestAttested(t *testing.T) {
	tests := []struct {
		mode, choice string
		want         bool
	}{
		{ModeOptOut, "", true},
		{ModeOptOut, "yes", true},
		{ModeOptOut, "no", false},
		{ModeOptIn, "", false},
		{ModeOptIn, "yes", true},
		{ModeOptIn, "no", false},
		{"", "", true}, // an unset mode is opt-out
	}
	for _, tc := range tests {
		d := &Domain{Name: "d", Attest: tc.choice}
		ok, why := d.Attested(tc.mode)
		if ok != tc.want {
			t.Errorf("mode %q, choice %q: attested %v, want %v", tc.mode, tc.choice, ok, tc.want)
		}
		if ok == (why != "") {
			t.Errorf("mode %q, choice %q: attested %v with reason %q", tc.mode, tc.choice, ok, why)
		}
	}
}
