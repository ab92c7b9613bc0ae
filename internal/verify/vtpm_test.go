package verify_test

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// vtpmGuest plays a vTPM guest through the real multiplexer: the vTPM's
// event records (firmware extends, the kernel's IMA extends) and the
// agent's IMA entries, in the order the bridge would record them.
type vtpmGuest struct {
	t     *testing.T
	m     *mux.Mux
	ident *conceal.Identity
	seq   uint64
	st    *vpcr.State
	boot  int
}

var vtpmBanks = []uint16{uint16(vpcr.SHA1), uint16(vpcr.SHA256)}

func newVTPMGuest(t *testing.T, m *mux.Mux) *vtpmGuest {
	ident, err := m.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x7e}, Name: "vm-v", VTPMBanks: vtpmBanks})
	if err != nil {
		t.Fatal(err)
	}
	st, err := vpcr.New([]vpcr.Alg{vpcr.SHA1, vpcr.SHA256})
	if err != nil {
		t.Fatal(err)
	}
	return &vtpmGuest{t: t, m: m, ident: ident, st: st}
}

// vtpmTestPCR is the PCR the vTPM tests' multiplexers anchor in: another
// than the shared world's, on the world's simulator (a process singleton).
const vtpmTestPCR = 14

// vtpmMux opens a multiplexer with a fresh store on the world's TPM: each
// opens a new epoch from PCR 14's current value.
func vtpmMux(t *testing.T) *mux.Mux {
	w := getWorld(t)
	st, err := logstore.Open(filepath.Join(t.TempDir(), "vtpm.db"), &logstore.Options{NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := mux.Open(context.Background(), w.tpm, st, mux.Config{PCR: vtpmTestPCR})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); st.Close() })
	return m
}

func (g *vtpmGuest) append(r *record.Record) {
	g.t.Helper()
	if _, err := g.m.Append(context.Background(), g.ident.ID(), r); err != nil {
		g.t.Fatal(err)
	}
}

// event journals a vTPM event (and applies it to the guest's own view).
func (g *vtpmGuest) event(e vpcr.Event) {
	g.t.Helper()
	g.seq++
	e.Seq = g.seq
	if err := g.st.Apply(e); err != nil {
		g.t.Fatal(err)
	}
	g.append(record.NewTPM(e, int64(g.seq)))
}

// power is the firmware's part of a boot: TPM_Init, Startup(CLEAR) and
// measured-boot extends of PCRs 0-9.
func (g *vtpmGuest) power() {
	g.boot++
	g.event(vpcr.Event{Kind: vpcr.KindInit})
	g.event(vpcr.Event{Kind: vpcr.KindStartup, Command: 0x144, Banks: []vpcr.Alg{vpcr.SHA1, vpcr.SHA256}})
	for pcr := 0; pcr < 10; pcr += 2 {
		g.extend(pcr, []byte(fmt.Sprintf("firmware boot %d pcr %d", g.boot, pcr)))
	}
}

// extend is a PCR_Extend of the hashes of data in both banks.
func (g *vtpmGuest) extend(pcr int, data []byte) {
	s1, s256 := sha1.Sum(data), sha256.Sum256(data)
	g.event(vpcr.Event{Kind: vpcr.KindExtend, Command: 0x182, PCR: pcr,
		Digests: []vpcr.Digest{{Alg: vpcr.SHA1, Value: s1[:]}, {Alg: vpcr.SHA256, Value: s256[:]}}})
}

// entries are what the guest kernel's IMA measures this boot: its
// boot_aggregate over vPCRs 0-9 (sha256 bank), then n files.
func (g *vtpmGuest) entries(n int) []ima.Entry {
	var pcrs [][]byte
	for i := 0; i < 10; i++ {
		pcrs = append(pcrs, g.st.Read(vpcr.SHA256, i))
	}
	agg := sha256.New()
	for _, p := range pcrs {
		agg.Write(p)
	}
	out := []ima.Entry{ima.NewIMANG(10, "sha256", agg.Sum(nil), "boot_aggregate")}
	for i := 1; i <= n; i++ {
		d := sha256.Sum256([]byte(fmt.Sprintf("file %d of boot %d", i, g.boot)))
		out = append(out, ima.NewIMANG(10, "sha256", d[:], fmt.Sprintf("/usr/bin/tool-%d", i)))
	}
	return out
}

// measure is the kernel extending PCR 10 for each entry (anchored at once).
func (g *vtpmGuest) measure(es []ima.Entry) {
	for _, e := range es {
		g.extend(10, e.TemplateData)
	}
}

// send is the agent streaming entries es (log indices from first).
func (g *vtpmGuest) send(es []ima.Entry, first int, bootID string) {
	for i, e := range es {
		g.append(&record.Record{Kind: record.KindMeasurement, Time: 1, Measurement: &record.Measurement{
			PCR: 10, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
			TemplateData: e.TemplateData, LogIndex: uint64(first + i), BootID: bootID}})
	}
}

func (g *vtpmGuest) verify() (*verify.Report, error) {
	g.t.Helper()
	nonce := []byte("a nonce for the vTPM guest, 32 b")
	ev, err := g.m.Evidence(context.Background(), g.ident.ID(), nonce)
	if err != nil {
		g.t.Fatal(err)
	}
	return verify.Verify(ev, verify.Options{Nonce: nonce, Identity: g.ident, AK: g.m.AK(), PCR: vtpmTestPCR})
}

// TestVTPMPairing: in vTPM mode the verifier pairs the agent's IMA entries
// one to one, in order, with the anchored PCR 10 extends, checks each
// boot_aggregate against the boot's vPCRs 0-9, and reports the vPCRs. What
// a guest root can do to its agent's stream (drop an entry, invent one,
// reorder them, lie about boot_aggregate, extend PCR 10 from user space
// with no entry) is each rejected, naming the record.
func TestVTPMPairing(t *testing.T) {
	tests := []struct {
		name string
		play func(g *vtpmGuest)
		want string // "" = trusted
	}{
		{"honest, two boots", func(g *vtpmGuest) {
			g.power()
			es := g.entries(5)
			g.measure(es)
			g.send(es, 0, "boot-1")
			g.power()
			g.append(&record.Record{Kind: record.KindReboot, Time: 1, Reboot: &record.Reboot{Reason: "new-boot-id", BootID: "boot-2"}})
			es = g.entries(3)
			g.measure(es)
			g.send(es, 0, "boot-2")
		}, ""},
		{"no agent at all: firmware and boot extends verify, the IMA ones are unexplained", func(g *vtpmGuest) {
			g.power()
			g.measure(g.entries(2))
		}, "anchored PCR 10 extend with no IMA entry (3 unexplained)"},
		{"firmware only, no IMA", func(g *vtpmGuest) { g.power() }, ""},
		{"suppressed: the agent drops the marker", func(g *vtpmGuest) {
			g.power()
			es := g.entries(4)
			g.measure(es)
			g.send(es[:4], 0, "boot-1")
		}, "anchored PCR 10 extend with no IMA entry (1 unexplained)"},
		{"invented: an entry the kernel never extended", func(g *vtpmGuest) {
			g.power()
			es := g.entries(2)
			g.measure(es)
			g.send(g.entries(3), 0, "boot-1")
		}, "has no anchored extend in its boot: invented"},
		{"reordered", func(g *vtpmGuest) {
			g.power()
			es := g.entries(3)
			g.measure(es)
			es[1], es[2] = es[2], es[1]
			g.send(es, 0, "boot-1")
		}, "does not match the anchored extend"},
		{"altered file digest", func(g *vtpmGuest) {
			g.power()
			es := g.entries(2)
			g.measure(es)
			d := sha256.Sum256([]byte("an allowed file"))
			es[2] = ima.NewIMANG(10, "sha256", d[:], "/usr/bin/tool-2")
			g.send(es, 0, "boot-1")
		}, "does not match the anchored extend"},
		{"boot_aggregate that is not the vPCRs'", func(g *vtpmGuest) {
			g.power()
			es := g.entries(1)
			es[0] = ima.NewIMANG(10, "sha256", make([]byte, 32), "boot_aggregate")
			g.measure(es)
			g.send(es, 0, "boot-1")
		}, "is not the hash of the boot's vPCRs 0-9"},
		{"user space extends PCR 10 with no entry", func(g *vtpmGuest) {
			g.power()
			es := g.entries(2)
			g.measure(es)
			g.extend(10, []byte("from /dev/tpm0"))
			g.send(es, 0, "boot-1")
		}, "anchored PCR 10 extend with no IMA entry"},
		{"entries of a boot no vTPM boot accounts for", func(g *vtpmGuest) {
			g.send(g.entries(1), 0, "boot-0")
			g.power()
		}, "which no vTPM boot accounts for"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newVTPMGuest(t, vtpmMux(t))
			tt.play(g)
			rep, err := g.verify()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				if rep.VTPM == nil {
					t.Fatal("no vTPM report")
				}
				// The reported vPCRs are the guest's own.
				for _, a := range []vpcr.Alg{vpcr.SHA1, vpcr.SHA256} {
					for i := 0; i < vpcr.NumPCRs; i++ {
						if got, want := rep.VTPM.PCRs[a.String()][i], hex.EncodeToString(g.st.Read(a, i)); got != want {
							t.Fatalf("vPCR %s:%d = %s, guest has %s", a, i, got, want)
						}
					}
				}
				if rep.VTPM.Boots != g.boot || rep.VTPM.BootAggregates != min(g.boot, rep.VTPM.Paired) {
					t.Fatalf("vtpm report %+v", rep.VTPM)
				}
				return
			}
			if !verify.IsRejection(err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want a rejection saying %q", err, tt.want)
			}
			t.Logf("rejected: %v", err)
		})
	}
}

// TestVTPMLaunchPins: a launch policy pins a vTPM VM's measured boot, its
// vPCRs 0-9 as the verifier replays them; another value, and a VM without
// a vTPM, are violations.
func TestVTPMLaunchPins(t *testing.T) {
	g := newVTPMGuest(t, vtpmMux(t))
	g.power()
	es := g.entries(2)
	g.measure(es)
	g.send(es, 0, "boot-1")
	nonce := []byte("a nonce for the vTPM guest, 32 b")
	ev, err := g.m.Evidence(context.Background(), g.ident.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	pin := func(v string) verify.Options {
		ext, err := policy.ParseLaunch([]byte(`{"vpcrs": {"sha256": {"0": ["` + v + `"]}}}`))
		if err != nil {
			t.Fatal(err)
		}
		return verify.Options{Nonce: nonce, Identity: g.ident, AK: g.m.AK(), PCR: vtpmTestPCR, Appraiser: policy.New(nil, nil).WithLaunch(ext.Launch)}
	}
	good := hex.EncodeToString(g.st.Read(vpcr.SHA256, 0))
	if _, err := verify.Verify(ev, pin(good)); err != nil {
		t.Fatalf("the guest's own vPCR 0 pinned: %v", err)
	}
	_, err = verify.Verify(ev, pin(strings.Repeat("ab", 32)))
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "vPCR value not allowed") {
		t.Fatalf("another vPCR 0: %v", err)
	}
	// A VM in agent mode has no vPCRs to pin.
	w := getWorld(t)
	o := opts(w, w.a, w.nonce)
	o.Appraiser = pin(good).Appraiser
	_, err = verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "no bridge-served vTPM") {
		t.Fatalf("pins on an agent-mode VM: %v", err)
	}
}
