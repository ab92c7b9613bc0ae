package daemon

import (
	"bytes"
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/qemu"
)

// bareXML is the test domain without the org.tpmmux.0 channel: with vsock
// off on this host (the env's), no guest transport reaches the bridge.
func (e *env) bareXML(name string) string {
	e.t.Helper()
	s := e.domainXML(name, "")
	bare := regexp.MustCompile(`(?s)<channel type='unix'>.*?</channel>`).ReplaceAllString(s, "")
	if bare == s {
		e.t.Fatal("test domain XML has no channel to remove")
	}
	return bare
}

// TestNoTransportWarned: a domain no guest transport reaches gets its
// identity with a warning in the bridge log and in vms (its evidence would
// verify with no measurement, which an operator must not take for a quiet
// guest); a domain with the channel gets none; hook.require_transport
// refuses the first with a message that names the fix.
func TestNoTransportWarned(t *testing.T) {
	e := newEnv(t)
	e.cfg.GuestUnixDir = "" // the dev transport would reach every VM
	e.start()
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.bareXML("vm-bare")})
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-ok", "")})
	if !e.log.contains("vm gets an identity that no guest transport reaches") {
		t.Fatal("no warning in the bridge log")
	}
	if bare := vmRow(t, e, "vm-bare", false); bare == nil || !bare.Live || !strings.Contains(bare.Warning, "no guest transport") {
		t.Fatalf("vms row of the bare domain: %+v", bare)
	}
	if ok := vmRow(t, e, "vm-ok", false); ok == nil || ok.Warning != "" {
		t.Fatalf("vms row of a domain with its channel: %+v", ok)
	}
	e.stop()

	e.cfg.Hook.RequireTransport = true
	e.start()
	_, err := e.call(&control.Request{Op: control.OpPrepare, XML: e.bareXML("vm-bare2")})
	if err == nil || !strings.Contains(err.Error(), "add the org.tpmmux.0 channel") || !strings.Contains(err.Error(), "hook.require_transport") {
		t.Fatalf("prepare with require_transport: %v", err)
	}
	if row := vmRow(t, e, "vm-bare2", true); row != nil {
		t.Fatalf("a refused domain got an identity: %+v", row)
	}
	e.mustCall(&control.Request{Op: control.OpPrepare, XML: e.domainXML("vm-ok2", "")})
}

// TestReportCIDCheck: the QMP check's log says "no vsock device" when the
// domain XML names none (not "guest-cid matches … cid=0"), and only a
// mismatch is reported as one.
func TestReportCIDCheck(t *testing.T) {
	tests := []struct {
		name     string
		want     uint32
		err      error
		log      string
		mismatch bool
	}{
		{"no vsock device", 0, nil, "no vsock device, as the domain XML says", false},
		{"cid matches", 42, nil, "guest-cid matches the domain XML", false},
		{"mismatch", 42, &qemu.CIDMismatchError{Want: 42, Got: 43}, "is not the domain XML's", true},
		{"check failed", 42, errors.New("qmp: timeout"), "qmp check failed", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			got := reportCIDCheck(slog.New(slog.NewTextHandler(&buf, nil)), "vm-q", tc.want, tc.err)
			if got != tc.mismatch || !strings.Contains(buf.String(), tc.log) {
				t.Fatalf("mismatch %v, log %q; want %v and %q", got, buf.String(), tc.mismatch, tc.log)
			}
			if tc.want == 0 && strings.Contains(buf.String(), "cid=0") {
				t.Fatalf("log speaks of cid 0: %q", buf.String())
			}
		})
	}
}
