package verify_test

import (
	"bytes"
	"context"
	"crypto/sha1"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// TestVTPMPairingIMAFallback: a guest kernel whose IMA cannot compute a
// bank's hash (Debian's 6.1 has no sha384 or sha512 when IMA starts)
// extends that bank with the SHA-1 of the template data zero-padded, or
// (newer kernels without CONFIG_IMA_COMPAT_FALLBACK_TPM_EXTEND) 0xfe
// bytes. The pairing accepts that in the sha384 and sha512 banks only,
// and only when another bank of the extend holds the entry's own hash.
// (vtpmMux extends the simulator's PCR 14, which tamper_test.go's forge
// needs untouched: files that use it sort after tamper_test.go.)
func TestVTPMPairingIMAFallback(t *testing.T) {
	sha1Padded := func(a vpcr.Alg, data []byte) []byte {
		s := sha1.Sum(data)
		return append(s[:], make([]byte, a.Size()-len(s))...)
	}
	fe := func(a vpcr.Alg, _ []byte) []byte {
		return append(bytes.Repeat([]byte{0xfe}, 20), make([]byte, a.Size()-20)...)
	}
	own := func(a vpcr.Alg, data []byte) []byte {
		h := a.Hash().New()
		h.Write(data)
		return h.Sum(nil)
	}
	other := func(a vpcr.Alg, data []byte) []byte { return sha1Padded(a, append([]byte("another "), data...)) }
	all := []vpcr.Alg{vpcr.SHA1, vpcr.SHA256, vpcr.SHA384, vpcr.SHA512}
	tests := []struct {
		name  string
		banks []vpcr.Alg
		fill  map[vpcr.Alg]func(vpcr.Alg, []byte) []byte // per bank; own hash when absent
		want  string                                     // "" = trusted
	}{
		{name: "every bank its own hash", banks: all},
		{name: "sha384 and sha512 padded sha1 (Linux 6.1)", banks: all,
			fill: map[vpcr.Alg]func(vpcr.Alg, []byte) []byte{vpcr.SHA384: sha1Padded, vpcr.SHA512: sha1Padded}},
		{name: "sha384 and sha512 0xfe (newer kernels)", banks: all,
			fill: map[vpcr.Alg]func(vpcr.Alg, []byte) []byte{vpcr.SHA384: fe, vpcr.SHA512: fe}},
		{name: "sha384 padded sha1 of other data", banks: all,
			fill: map[vpcr.Alg]func(vpcr.Alg, []byte) []byte{vpcr.SHA384: other}, want: "(sha384 bank): entries reordered or altered"},
		{name: "sha256 padded sha1", banks: all,
			fill: map[vpcr.Alg]func(vpcr.Alg, []byte) []byte{vpcr.SHA256: sha1Padded}, want: "(sha256 bank): entries reordered or altered"},
		{name: "only fallback banks", banks: []vpcr.Alg{vpcr.SHA384, vpcr.SHA512},
			fill: map[vpcr.Alg]func(vpcr.Alg, []byte) []byte{vpcr.SHA384: sha1Padded, vpcr.SHA512: fe}, want: "holds only IMA's fallback digests"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := vtpmMux(t)
			var ids []uint16
			for _, a := range tt.banks {
				ids = append(ids, uint16(a))
			}
			ident, err := m.NewVM(context.Background(), mux.Launch{UUID: [16]byte{0x7f}, Name: "vm-fallback", VTPMBanks: ids})
			if err != nil {
				t.Fatal(err)
			}
			st, err := vpcr.New(tt.banks)
			if err != nil {
				t.Fatal(err)
			}
			g := &vtpmGuest{t: t, m: m, ident: ident, st: st, boot: 1}
			g.event(vpcr.Event{Kind: vpcr.KindInit})
			g.event(vpcr.Event{Kind: vpcr.KindStartup, Command: 0x144, Banks: tt.banks})
			extend := func(pcr int, data []byte, fill map[vpcr.Alg]func(vpcr.Alg, []byte) []byte) {
				var ds []vpcr.Digest
				for _, a := range tt.banks {
					f := own
					if fill[a] != nil {
						f = fill[a]
					}
					ds = append(ds, vpcr.Digest{Alg: a, Value: f(a, data)})
				}
				g.event(vpcr.Event{Kind: vpcr.KindExtend, Command: 0x182, PCR: pcr, Digests: ds})
			}
			extend(0, []byte("firmware"), nil)
			es := g.entries(2)
			if !st.IsActive(vpcr.SHA256) {
				es = es[1:] // no boot_aggregate bank: files only
			}
			for _, e := range es {
				extend(10, e.TemplateData, tt.fill)
			}
			g.send(es, 0, "boot-1")
			_, err = g.verify()
			if tt.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
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
