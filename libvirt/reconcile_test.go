package libvirt

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
)

func uuidN(n byte) [16]byte { return [16]byte{15: n} }

func dom(name string, n byte) DomainInfo {
	return DomainInfo{Name: name, UUID: uuidN(n), ID: int32(n),
		XML: []byte("<domain type='qemu'><name>" + name + "</name><uuid>" + conceal.FormatUUID(uuidN(n)) + "</uuid></domain>")}
}

func vm(name string, n, id byte) KnownVM {
	return KnownVM{ID: [32]byte{id}, Name: name, UUID: uuidN(n)}
}

func names[T any](xs []T, f func(T) string) []string {
	out := []string{}
	for _, x := range xs {
		out = append(out, f(x))
	}
	return out
}

func TestReconcile(t *testing.T) {
	tests := []struct {
		name                       string
		running                    []DomainInfo
		known                      []KnownVM
		matched, unknown, teardown []string // domain names; teardown as name/id
	}{
		{name: "nothing"},
		{name: "all match",
			running: []DomainInfo{dom("a", 1), dom("b", 2)},
			known:   []KnownVM{vm("b", 2, 20), vm("a", 1, 10)},
			matched: []string{"b", "a"}},
		{name: "running without identity",
			running: []DomainInfo{dom("a", 1), dom("new", 3)},
			known:   []KnownVM{vm("a", 1, 10)},
			matched: []string{"a"}, unknown: []string{"new"}},
		{name: "identity whose domain is gone",
			running: []DomainInfo{dom("a", 1)},
			known:   []KnownVM{vm("a", 1, 10), vm("gone", 4, 40)},
			matched: []string{"a"}, teardown: []string{"gone/40"}},
		{name: "same name, new uuid: old identity ends, new domain unknown",
			running: []DomainInfo{dom("a", 5)},
			known:   []KnownVM{vm("a", 1, 10)},
			unknown: []string{"a"}, teardown: []string{"a/10"}},
		{name: "same uuid, renamed domain",
			running: []DomainInfo{dom("a2", 1)},
			known:   []KnownVM{vm("a", 1, 10)},
			unknown: []string{"a2"}, teardown: []string{"a/10"}},
		{name: "two identities claim one domain: first keeps it",
			running: []DomainInfo{dom("a", 1)},
			known:   []KnownVM{vm("a", 1, 11), vm("a", 1, 10)},
			matched: []string{"a"}, teardown: []string{"a/10"}},
		{name: "libvirtd lists nothing",
			known:    []KnownVM{vm("a", 1, 10), vm("b", 2, 20)},
			teardown: []string{"a/10", "b/20"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Reconcile(tt.running, tt.known)
			got := [][]string{
				names(p.Matched, func(m Match) string { return m.Domain.Name }),
				names(p.Unknown, func(d DomainInfo) string { return d.Name }),
				names(p.Teardown, func(v KnownVM) string {
					return v.Name + "/" + string('0'+rune(v.ID[0]/10)) + string('0'+rune(v.ID[0]%10))
				}),
			}
			want := [][]string{tt.matched, tt.unknown, tt.teardown}
			for i, what := range []string{"matched", "unknown", "teardown"} {
				if want[i] == nil {
					want[i] = []string{}
				}
				if !slices.Equal(got[i], want[i]) {
					t.Errorf("%s %q, want %q", what, got[i], want[i])
				}
			}
			for _, m := range p.Matched {
				if m.VM.Name != m.Domain.Name || m.VM.UUID != m.Domain.UUID {
					t.Errorf("matched %+v with %s", m.VM, m.Domain.Name)
				}
			}
		})
	}
}

func TestPlanApply(t *testing.T) {
	optOut := DomainInfo{Name: "private", UUID: uuidN(7), XML: []byte(`<domain type='qemu'><name>private</name><uuid>00000000-0000-0000-0000-000000000007</uuid>
<metadata><tpmmux:attest xmlns:tpmmux="https://tpmmux.dev/xmlns/domain/1" enabled="no"/></metadata></domain>`)}
	bad := DomainInfo{Name: "broken", UUID: uuidN(8), XML: []byte("<domain")}
	tests := []struct {
		name     string
		plan     Plan
		failOn   string
		wantTorn []string
		wantErr  string
		wantLog  []string
	}{
		{name: "tears down and reports",
			plan:     Plan{Unknown: []DomainInfo{dom("new", 3), optOut, bad}, Teardown: []KnownVM{vm("gone", 4, 40), vm("old", 5, 50)}},
			wantTorn: []string{"gone", "old"},
			wantLog: []string{"level=WARN msg=\"running domain without tpmmux identity: its measurements", "vm=new",
				"level=INFO msg=\"running domain opted out", "vm=private", "XML does not parse\" vm=broken",
				"vm=gone uuid=00000000-0000-0000-0000-000000000004 reason=missed-stop"}},
		{name: "goes on past a failure",
			plan:     Plan{Teardown: []KnownVM{vm("gone", 4, 40), vm("old", 5, 50)}},
			failOn:   "gone",
			wantTorn: []string{"gone", "old"},
			wantErr:  "tear down gone (280000000000): store full"},
		{name: "nothing to do", plan: Plan{Matched: []Match{{VM: vm("a", 1, 10), Domain: dom("a", 1)}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			log := slog.New(slog.NewTextHandler(&buf, nil))
			var torn []string
			err := tt.plan.Apply(context.Background(), func(_ context.Context, v KnownVM, reason string) error {
				if reason != ReasonMissedStop {
					t.Errorf("reason %q", reason)
				}
				torn = append(torn, v.Name)
				if v.Name == tt.failOn {
					return errors.New("store full")
				}
				return nil
			}, log)
			if !slices.Equal(torn, tt.wantTorn) {
				t.Errorf("torn down %q, want %q", torn, tt.wantTorn)
			}
			if (err == nil) != (tt.wantErr == "") || (err != nil && !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("err %v, want %q", err, tt.wantErr)
			}
			for _, w := range tt.wantLog {
				if !strings.Contains(buf.String(), w) {
					t.Errorf("log lacks %q:\n%s", w, buf.String())
				}
			}
		})
	}
}

func TestPlanApplyCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	called := false
	err := Plan{Teardown: []KnownVM{vm("gone", 4, 40)}}.Apply(ctx, func(context.Context, KnownVM, string) error { called = true; return nil }, slog.New(slog.DiscardHandler))
	if !errors.Is(err, context.Canceled) || called {
		t.Fatalf("err %v, called %v", err, called)
	}
}
