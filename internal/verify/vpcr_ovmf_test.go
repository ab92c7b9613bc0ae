package verify_test

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"maps"
	"os"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// ovmfBoot is testdata/ovmf-boot.json: the vTPM records of vPCRs 0-9 of a
// real OVMF -> GRUB -> Linux boot on the bridge-served vTPM, and the
// launch-policy pins of vPCRs 0-9 the guest's own firmware event log
// replays to (internal/vtpm TestQEMUOVMFMeasuredBoot writes it).
type ovmfBoot struct {
	Extends []struct {
		PCR     int               `json:"pcr"`
		Type    string            `json:"type"`
		Event   string            `json:"event"`
		Digests map[string]string `json:"digests"`
	} `json:"extends"`
	VPCRs map[string]map[string][]string `json:"vpcrs"`
}

// playOVMFBoot journals the real boot's extends through the multiplexer
// as the vTPM would (INIT, Startup, the firmware's and GRUB's extends),
// then the kernel's IMA extends and the agent's entries.
func playOVMFBoot(t *testing.T) (*vtpmGuest, *ovmfBoot) {
	t.Helper()
	raw, err := os.ReadFile("testdata/ovmf-boot.json")
	if err != nil {
		t.Fatal(err)
	}
	var b ovmfBoot
	if err := json.Unmarshal(raw, &b); err != nil {
		t.Fatal(err)
	}
	g := newVTPMGuest(t, vtpmMux(t))
	g.boot++
	g.event(vpcr.Event{Kind: vpcr.KindInit})
	g.event(vpcr.Event{Kind: vpcr.KindStartup, Command: 0x144, Banks: []vpcr.Alg{vpcr.SHA1, vpcr.SHA256}})
	for _, x := range b.Extends {
		var ds []vpcr.Digest
		for _, a := range []vpcr.Alg{vpcr.SHA1, vpcr.SHA256} {
			v, err := hex.DecodeString(x.Digests[a.String()])
			if err != nil || len(v) != a.Size() {
				t.Fatalf("fixture: PCR %d %s digest %q", x.PCR, a, x.Digests[a.String()])
			}
			ds = append(ds, vpcr.Digest{Alg: a, Value: v})
		}
		g.event(vpcr.Event{Kind: vpcr.KindExtend, Command: 0x182, PCR: x.PCR, Digests: ds})
	}
	es := g.entries(3)
	g.measure(es)
	g.send(es, 0, "boot-1")
	return g, &b
}

// TestVTPMLaunchPinsOVMF: a launch policy pins vPCRs 0-9 of both banks to
// a real OVMF + GRUB measured boot. The same boot is trusted; each way a
// boot differs in one PCR (another firmware, boot variable, boot loader,
// kernel command line or kernel) is rejected naming that vPCR, as is a
// guest root that extends PCR 8 after boot. A pin may allow several values.
func TestVTPMLaunchPinsOVMF(t *testing.T) {
	tests := []struct {
		name  string
		pins  func(p map[string]map[string][]string)
		after func(g *vtpmGuest) // what the guest does after boot
		want  string             // "" = trusted
	}{
		{name: "the boot's own values"},
		{name: "sha1 bank only", pins: func(p map[string]map[string][]string) { delete(p, "sha256") }},
		{name: "PCRs 0-7 only (firmware)", pins: func(p map[string]map[string][]string) {
			delete(p["sha1"], "8")
			delete(p["sha1"], "9")
			delete(p["sha256"], "8")
			delete(p["sha256"], "9")
		}},
		{name: "an allowed list with another value", pins: func(p map[string]map[string][]string) {
			p["sha256"]["4"] = append([]string{strings.Repeat("ab", 32)}, p["sha256"]["4"]...)
		}},
		{name: "another firmware (PCR 0)", pins: func(p map[string]map[string][]string) {
			p["sha256"]["0"] = []string{strings.Repeat("00", 32)}
		}, want: "vpcr:sha256:0 "},
		{name: "another boot order (PCR 1, sha1)", pins: func(p map[string]map[string][]string) {
			p["sha1"]["1"] = []string{strings.Repeat("11", 20)}
		}, want: "vpcr:sha1:1 "},
		{name: "another boot loader (PCR 4)", pins: func(p map[string]map[string][]string) {
			p["sha256"]["4"] = p["sha256"]["5"]
		}, want: "vpcr:sha256:4 "},
		{name: "another kernel command line (PCR 8)", pins: func(p map[string]map[string][]string) {
			p["sha256"]["8"] = []string{strings.Repeat("88", 32)}
		}, want: "vpcr:sha256:8 "},
		{name: "another kernel (PCR 9)", pins: func(p map[string]map[string][]string) {
			p["sha256"]["9"] = []string{strings.Repeat("99", 32)}
		}, want: "vpcr:sha256:9 "},
		{name: "guest root extends PCR 8 after boot", after: func(g *vtpmGuest) {
			g.extend(8, []byte("grub_cmd: something guest root ran later"))
		}, want: "vpcr:sha1:8 "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, b := playOVMFBoot(t)
			if tt.after != nil {
				tt.after(g)
			}
			// The fixture's pins are the replay of its extends: the
			// multiplexer's vPCRs, as the guest saw them.
			for bank, pcrs := range b.VPCRs {
				a, _ := vpcr.ParseAlg(bank)
				for i := 0; i <= 9; i++ {
					if got := hex.EncodeToString(g.st.Read(a, i)); tt.after == nil && pcrs[itoa(i)][0] != got {
						t.Fatalf("fixture pin %s:%d %s, replay of its extends %s", bank, i, pcrs[itoa(i)][0], got)
					}
				}
			}
			pins := map[string]map[string][]string{}
			for bank, pcrs := range b.VPCRs {
				pins[bank] = maps.Clone(pcrs)
			}
			if tt.pins != nil {
				tt.pins(pins)
			}
			raw, err := json.Marshal(map[string]any{"vpcrs": pins})
			if err != nil {
				t.Fatal(err)
			}
			ext, err := policy.ParseLaunch(raw)
			if err != nil {
				t.Fatal(err)
			}
			nonce := []byte("a nonce for the vTPM guest, 32 b")
			ev, err := g.m.Evidence(context.Background(), g.ident.ID(), nonce)
			if err != nil {
				t.Fatal(err)
			}
			appr := policy.New(nil, nil).WithLaunch(ext.Launch)
			_, err = verify.Verify(ev, verify.Options{Nonce: nonce, Identity: g.ident, AK: g.m.AK(), PCR: vtpmTestPCR, Appraiser: appr})
			if tt.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				n := 0
				for _, p := range pins {
					n += len(p)
				}
				if l := appr.Report().Launch; l == nil || !l.OK || len(l.Checked) != n {
					t.Fatalf("launch appraisal %+v, want %d vPCRs checked", l, n)
				}
				return
			}
			if !verify.IsRejection(err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want a rejection naming %q", err, strings.TrimSpace(tt.want))
			}
			t.Logf("rejected: %v", err)
		})
	}
}

func itoa(i int) string { return string(rune('0' + i)) }
