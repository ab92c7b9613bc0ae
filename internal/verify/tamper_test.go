package verify_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

func opts(w *world, ident *conceal.Identity, nonce []byte) verify.Options {
	return verify.Options{Nonce: nonce, Identity: ident, AK: w.tpm.AK(), PCR: 13}
}

// gOf returns the global index of record s in ev.
func gOf(ev *evidence.Evidence, s int) uint64 { return ev.Records[s].G }

// locate returns the batch and entry offset of global index g.
func locate(ev *evidence.Evidence, g uint64) (int, int) {
	for i := len(ev.Log) - 1; i >= 0; i-- {
		if ev.Log[i].G0 <= g {
			off := int(g - ev.Log[i].G0)
			if ev.Log[i].G0 == 0 {
				off--
			}
			return i, off
		}
	}
	return -1, -1
}

func swapEntries(ev *evidence.Evidence, g1, g2 uint64) {
	b1, o1 := locate(ev, g1)
	b2, o2 := locate(ev, g2)
	e1 := ev.Log[b1].Entries[o1*64 : o1*64+64]
	e2 := ev.Log[b2].Entries[o2*64 : o2*64+64]
	tmp := append([]byte(nil), e1...)
	copy(e1, e2)
	copy(e2, tmp)
}

func TestHonestEvidenceAccepted(t *testing.T) {
	w := getWorld(t)
	for _, tt := range []struct {
		name  string
		ev    *evidence.Evidence
		ident *conceal.Identity
		nonce []byte
		recs  int
		ended bool
	}{
		{"A before teardown", w.evA, w.a, w.nonce, 13, false},
		{"B", w.evB, w.b, w.nonce, 13, false},
		{"A after teardown", w.evAEnd, w.a, w.nonceE, 14, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rep, err := verify.Verify(clone(t, tt.ev), opts(w, tt.ident, tt.nonce))
			if err != nil {
				t.Fatalf("honest evidence rejected: %v", err)
			}
			if !rep.Trusted || !rep.Fresh || rep.Records != tt.recs || rep.Counts.Measurements != 12 || rep.Ended != tt.ended {
				t.Fatalf("report = %+v", rep)
			}
		})
	}
	o := opts(w, w.a, nil)
	o.PostMortem = true
	rep, err := verify.Verify(clone(t, w.finalA), o)
	if err != nil || !rep.Trusted || !rep.Ended || rep.Fresh {
		t.Fatalf("post-mortem evidence: %v %+v", err, rep)
	}
}

// TestTamper is the table of tamper classes: each must be rejected, at the
// right step, with a precise reason.
func TestTamper(t *testing.T) {
	w := getWorld(t)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tests := []struct {
		name   string
		base   *evidence.Evidence
		mutate func(ev *evidence.Evidence)
		opts   func(o *verify.Options)
		step   int
		want   string
	}{
		{name: "swap two leaves", mutate: func(ev *evidence.Evidence) {
			swapEntries(ev, gOf(ev, 1), gOf(ev, 1)+1)
		}, step: 2, want: "replays to"},
		{name: "move A's leaf into B's place", mutate: func(ev *evidence.Evidence) {
			gb := gOf(w.evB, 5)
			swapEntries(ev, gOf(ev, 5), gb)
			ev.Records[5].G = gb
		}, step: 2, want: "replays to"},
		{name: "drop A's last record", mutate: func(ev *evidence.Evidence) {
			ev.Records = ev.Records[:len(ev.Records)-1]
		}, step: 4, want: "record 12 missing: its tag is at global index"},
		{name: "drop a middle record", mutate: func(ev *evidence.Evidence) {
			ev.Records = append(ev.Records[:6:6], ev.Records[7:]...)
		}, step: 4, want: "record 6 missing: its tag is at global index"},
		{name: "reorder A's records", mutate: func(ev *evidence.Evidence) {
			ev.Records[3], ev.Records[4] = ev.Records[4], ev.Records[3]
		}, step: 4, want: "records out of order: position 3 holds record 4"},
		{name: "reorder A's records keeping indices", mutate: func(ev *evidence.Evidence) {
			ev.Records[3].R, ev.Records[4].R = ev.Records[4].R, ev.Records[3].R
		}, step: 4, want: "record 3 does not match its commitment"},
		{name: "flip a byte in a record", mutate: func(ev *evidence.Evidence) {
			r := ev.Records[7].R
			r[len(r)-3] ^= 1
		}, step: 4, want: "record 7 does not match its commitment"},
		{name: "flip a byte in a leaf", mutate: func(ev *evidence.Evidence) {
			b, o := locate(ev, gOf(ev, 2))
			ev.Log[b].Entries[o*64+40] ^= 0x80
		}, step: 2, want: "replays to"},
		{name: "flip a byte in another VM's leaf", mutate: func(ev *evidence.Evidence) {
			b, o := locate(ev, gOf(w.evB, 2))
			ev.Log[b].Entries[o*64] ^= 1
		}, step: 2, want: "replays to"},
		{name: "drop a middle batch", mutate: func(ev *evidence.Evidence) {
			ev.Log = append(ev.Log[:2:2], ev.Log[3:]...)
		}, step: 2, want: "batch 2 starts at global index"},
		{name: "drop the last batch", mutate: func(ev *evidence.Evidence) {
			ev.Log = ev.Log[:len(ev.Log)-1]
		}, step: 2, want: "replays to"},
		{name: "reorder batches", mutate: func(ev *evidence.Evidence) {
			ev.Log[2], ev.Log[3] = ev.Log[3], ev.Log[2]
		}, step: 2, want: "batch 2 starts at global index"},
		{name: "wrong nonce", opts: func(o *verify.Options) { o.Nonce = []byte("another nonce, of the verifier") }, step: 1, want: "extraData does not match"},
		{name: "old evidence replayed for a new nonce", base: w.evA, opts: func(o *verify.Options) { o.Nonce = w.nonceE }, step: 1, want: "extraData does not match"},
		{name: "A's evidence checked with B's identity", opts: func(o *verify.Options) { o.Identity = w.b }, step: 1, want: "extraData does not match"},
		{name: "B's evidence presented for A", base: w.evB, step: 1, want: "extraData does not match"},
		{name: "verifier trusts another AK", opts: func(o *verify.Options) { o.AK = &otherKey.PublicKey }, step: 1, want: "signature"},
		{name: "quote signed by another key", mutate: func(ev *evidence.Evidence) {
			ev.Quote.Signature, _ = resign(t, ev.Quote.Attest)
		}, step: 1, want: "signature"},
		{name: "flip a byte in the quote", mutate: func(ev *evidence.Evidence) {
			ev.Quote.Attest[len(ev.Quote.Attest)-5] ^= 1
		}, step: 1, want: "signature"},
		{name: "changed PCR 23 value", mutate: func(ev *evidence.Evidence) {
			ev.PCRValues[len(ev.PCRValues)-1].SHA256[0] ^= 1
		}, step: 1, want: "do not match the quote's PCR digest"},
		{name: "changed host PCR value", mutate: func(ev *evidence.Evidence) {
			ev.PCRValues[0].SHA256[31] ^= 1
		}, step: 1, want: "do not match the quote's PCR digest"},
		{name: "claims another PCR", mutate: func(ev *evidence.Evidence) { ev.PCR = 10 }, step: 1, want: "evidence is for PCR 10"},
		{name: "hidden teardown", base: w.evAEnd, mutate: func(ev *evidence.Evidence) {
			ev.Records = ev.Records[:len(ev.Records)-1]
		}, opts: func(o *verify.Options) { o.Nonce = w.nonceE }, step: 4, want: "record 13 missing: its tag is at global index"},
		{name: "B's record added to A's", mutate: func(ev *evidence.Evidence) {
			ev.Records = append(ev.Records, w.evB.Records[3])
		}, step: 4, want: "record 13 has no tag in the log"},
		{name: "altered epoch record", mutate: func(ev *evidence.Evidence) {
			ev.Epoch.Record[bytes.Index(ev.Epoch.Record, []byte("test-host"))] ^= 1
		}, step: 2, want: "replays to"},
		{name: "post-mortem quote as fresh evidence", base: w.finalA, step: 1, want: "post-mortem quote, not fresh"},
		{name: "fresh evidence relabelled post-mortem", mutate: func(ev *evidence.Evidence) { ev.Kind = evidence.KindFinal },
			opts: func(o *verify.Options) { o.PostMortem = true }, step: 4, want: "last record is not a teardown"},
		{name: "A's final quote for B", base: w.finalA, opts: func(o *verify.Options) { o.PostMortem = true; o.Identity = w.b }, step: 4, want: ""},
		{name: "batched proof on a plain quote", mutate: func(ev *evidence.Evidence) {
			ev.Batched = &evidence.QuoteProof{Index: 0, Count: 2, Path: []evidence.Hex{make([]byte, 32)}}
		}, step: 1, want: "batched quote does not cover"},
		{name: "malformed batched proof", mutate: func(ev *evidence.Evidence) { ev.Batched = &evidence.QuoteProof{Count: 1} }, step: 1, want: "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := tt.base
			if base == nil {
				base = w.evA
			}
			ev := clone(t, base)
			if tt.mutate != nil {
				tt.mutate(ev)
			}
			o := opts(w, w.a, w.nonce)
			if tt.opts != nil {
				tt.opts(&o)
			}
			rep, err := verify.Verify(ev, o)
			if err == nil {
				t.Fatalf("tampered evidence accepted: %+v", rep)
			}
			var rj *verify.Rejection
			if !errorsAs(err, &rj) {
				t.Fatalf("error is not a rejection: %v", err)
			}
			if rep.Trusted {
				t.Fatal("report says trusted")
			}
			if tt.want != "" && !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("reason %q does not say %q", err, tt.want)
			}
			if tt.want != "" && rj.Step != tt.step {
				t.Fatalf("rejected at step %d (%v), want step %d", rj.Step, err, tt.step)
			}
			t.Logf("rejected at step %d: %v", rj.Step, err)
		})
	}
}

// TestForgedHistories covers what only a misbehaving bridge could produce:
// the log itself is genuine (extended and quoted by the real TPM), but the
// record sequence breaks a rule of step 4.
func TestForgedHistories(t *testing.T) {
	w := getWorld(t)
	ident, err := conceal.NewIdentity([16]byte{0xcc})
	if err != nil {
		t.Fatal(err)
	}
	gen := &record.Record{Kind: record.KindGenesis, Genesis: &record.Genesis{UUID: ident.UUID, Instance: ident.Instance, Name: "vm-c"}}
	td := &record.Record{Kind: record.KindTeardown, Teardown: &record.Teardown{Reason: "destroyed"}}
	otherGen := &record.Record{Kind: record.KindGenesis, Genesis: &record.Genesis{UUID: [16]byte{0xdd}, Instance: ident.Instance, Name: "vm-d"}}
	// A genesis committed in another epoch (the real one the VM started
	// in), re-rooted by a host root into a forged epoch.
	replanted := &record.Record{Kind: record.KindGenesis, Genesis: &record.Genesis{UUID: ident.UUID, Instance: ident.Instance, Name: "vm-c", Epoch: [32]byte{0xee}}}
	tests := []struct {
		name string
		pcr  int
		recs []*record.Record
		want string
	}{
		{"honest forge is accepted", 11, []*record.Record{gen, measurement("vm-c", 1), td}, ""},
		{"record after teardown", 12, []*record.Record{gen, measurement("vm-c", 1), td, measurement("vm-c", 2)}, "record 3 follows the teardown record 2"},
		{"no genesis first", 8, []*record.Record{measurement("vm-c", 1), td}, "record 0 is a measurement record, not genesis"},
		{"second genesis", 14, []*record.Record{gen, gen}, "record 1 is a second genesis record"},
		{"genesis of another domain", 15, []*record.Record{otherGen}, "genesis record is for uuid"},
		{"genesis replanted from another epoch", 9, []*record.Record{replanted, measurement("vm-c", 1)}, "the VM's leaves were replanted in another epoch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nonce := []byte(tt.name + ": a nonce")
			ev := forge(t, w.tpm, tt.pcr, ident, tt.recs, nonce)
			o := opts(w, ident, nonce)
			o.PCR = tt.pcr
			_, err := verify.Verify(ev, o)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want rejection %q", err, tt.want)
			}
		})
	}
}

// TestConcealment: A's evidence reveals nothing of B beyond the count of
// all entries in the log.
func TestConcealment(t *testing.T) {
	w := getWorld(t)
	bin, err := w.evA.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(w.evA)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("no record bytes or paths of B", func(t *testing.T) {
		if len(w.bRecs) == 0 {
			t.Fatal("no B records to look for")
		}
		for i, r := range w.bRecs {
			if bytes.Contains(bin, r) || bytes.Contains(js, r) {
				t.Errorf("A's evidence contains B's record %d", i+1)
			}
			h := record.Hash(r)
			if bytes.Contains(bin, h[:]) {
				t.Errorf("A's evidence contains the hash of B's record %d", i+1)
			}
		}
		for _, needle := range append(append([]string{}, w.bPaths...), "vm-b", conceal.FormatUUID(w.b.UUID)) {
			if bytes.Contains(bin, []byte(needle)) || bytes.Contains(js, []byte(needle)) {
				t.Errorf("A's evidence contains %q", needle)
			}
		}
		// The same check must find A's own paths, or it proves nothing.
		if !bytes.Contains(bin, []byte("/opt/vm-a/bin/tool-001")) {
			t.Fatal("the search does not even find A's own path")
		}
	})
	t.Run("B's leaves are not linkable without K_B", func(t *testing.T) {
		// Every guess a verifier of A can make without K_B, using B's public
		// id and B's exact record contents (guessed known-good hashes),
		// matches no entry of the log.
		entries := map[conceal.Digest]bool{}
		for _, b := range w.evA.Log {
			for j := 0; j < b.Entries.Len(); j++ {
				tg, c := b.Entries.At(j)
				entries[tg], entries[c] = true, true
			}
		}
		idB := w.b.ID()
		// (A's own key finds A's own tags, so for it only commitments count.)
		guessers := []*conceal.Keys{conceal.Derive(conceal.Key{}), conceal.Derive(conceal.Key(idB))}
		ka := w.a.Keys()
		for s, r := range w.bRecs {
			h := record.Hash(r)
			for _, k := range guessers {
				if entries[k.Tag(uint64(s+1))] || entries[k.Commit(idB, uint64(s+1), h)] {
					t.Fatalf("a guess without K_B matched B's record %d", s+1)
				}
			}
			if entries[ka.Commit(idB, uint64(s+1), h)] {
				t.Fatalf("A's key commits to B's record %d", s+1)
			}
			if entries[h] {
				t.Fatalf("B's record hash %d appears in the log", s+1)
			}
		}
		// With K_B the same search finds all of B's records: the guesses
		// above failed for lack of the key, not for a wrong construction.
		kb := w.b.Keys()
		for s := range w.bRecs {
			if !entries[kb.Tag(uint64(s+1))] {
				t.Fatalf("B's own key does not find record %d", s+1)
			}
		}
		// A verifier holding a fresh key finds nothing at all.
		stranger, _ := conceal.NewIdentity(w.b.UUID)
		stranger.Instance = w.b.Instance
		if _, err := verify.Verify(clone(t, w.evA), opts(w, stranger, w.nonce)); err == nil {
			t.Fatal("a stranger's key verified A's evidence")
		}
	})
	t.Run("entries look uniformly random", func(t *testing.T) {
		var all []byte
		for _, b := range w.evA.Log {
			all = append(all, b.Entries...)
		}
		ones := 0
		var hist [256]int
		for _, c := range all {
			hist[c]++
			for ; c != 0; c &= c - 1 {
				ones++
			}
		}
		bits := float64(len(all) * 8)
		// Monobit: within 5 standard deviations of half.
		if dev := (float64(ones) - bits/2) / (0.5 * sqrt(bits)); dev > 5 || dev < -5 {
			t.Fatalf("monobit deviation %.1f sigma over %d bytes", dev, len(all))
		}
		if len(all) < 1000 {
			t.Fatalf("only %d bytes of entries", len(all))
		}
	})
	t.Run("a restarted VM's identical records are unlinkable", func(t *testing.T) {
		// Two instances writing identical content produce unrelated tags
		// and commitments, because instance and K are new on every start.
		i1, _ := conceal.NewIdentity(w.b.UUID)
		i2, _ := conceal.NewIdentity(w.b.UUID)
		h := record.Hash(w.bRecs[0])
		if i1.Keys().Tag(1) == i2.Keys().Tag(1) || i1.Keys().Commit(i1.ID(), 1, h) == i2.Keys().Commit(i2.ID(), 1, h) {
			t.Fatal("two instances share a tag or commitment")
		}
	})
}

func sqrt(x float64) float64 {
	z := x / 2
	for i := 0; i < 50; i++ {
		z = (z + x/z) / 2
	}
	return z
}

// TestInformationalFieldsIgnored: fields docs/evidence.md marks
// informational can be changed at will without changing the verdict or the
// authenticated values in the report.
func TestInformationalFieldsIgnored(t *testing.T) {
	w := getWorld(t)
	ev := clone(t, w.evA)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ev.AK = elliptic.MarshalCompressed(otherKey.Curve, otherKey.X, otherKey.Y)
	ev.Epoch.Number = 99
	ev.VM = evidence.VM{UUID: conceal.FormatUUID(w.b.UUID), Instance: w.b.Instance[:], Name: "vm-b"}
	ev.Host = "somewhere-else"
	rep, err := verify.Verify(ev, opts(w, w.a, w.nonce))
	if err != nil {
		t.Fatalf("informational change rejected: %v", err)
	}
	if rep.VM.Name != "vm-a" || rep.VM.UUID != conceal.FormatUUID(w.a.UUID) || rep.Epoch.Host != "test-host" {
		t.Fatalf("report took unauthenticated values: %+v %+v", rep.VM, rep.Epoch)
	}
}

// TestIncremental: a verifier that kept a checkpoint verifies only the
// delta, with the same guarantees.
func TestIncremental(t *testing.T) {
	w := getWorld(t)
	rep, err := verify.Verify(clone(t, w.evA), opts(w, w.a, w.nonce))
	if err != nil {
		t.Fatal(err)
	}
	cp := rep.Checkpoint
	if cp == nil || cp.Records != 13 {
		t.Fatalf("checkpoint %+v", cp)
	}
	nonce := []byte("delta-nonce of the verifier")
	delta, err := w.m.EvidenceSince(context.Background(), w.a.ID(), nonce, cp.Since())
	if err != nil {
		t.Fatal(err)
	}
	full, _ := w.evAEnd.MarshalBinary()
	db, _ := delta.MarshalBinary()
	if len(delta.Records) != 1 || len(db) >= len(full) {
		t.Fatalf("delta holds %d records, %d bytes (full %d)", len(delta.Records), len(db), len(full))
	}
	o := opts(w, w.a, nonce)
	o.Checkpoint = cp
	rep2, err := verify.Verify(clone(t, delta), o)
	if err != nil {
		t.Fatalf("delta rejected: %v", err)
	}
	if rep2.Records != 14 || !rep2.Ended || rep2.Checkpoint.Records != 14 {
		t.Fatalf("delta report %+v", rep2)
	}
	tests := []struct {
		name   string
		mutate func(ev *evidence.Evidence, o *verify.Options)
		want   string
	}{
		{"delta without checkpoint", func(ev *evidence.Evidence, o *verify.Options) { o.Checkpoint = nil }, "has no checkpoint"},
		{"checkpoint with another PCR value", func(ev *evidence.Evidence, o *verify.Options) {
			c := *cp
			c.PCR = append([]byte(nil), c.PCR...)
			c.PCR[0] ^= 1
			o.Checkpoint = &c
		}, "replays to"},
		{"delta from another position", func(ev *evidence.Evidence, o *verify.Options) { ev.From.Batch-- }, "not the delta after"},
		{"teardown hidden from the delta", func(ev *evidence.Evidence, o *verify.Options) { ev.Records = nil }, "record 13 missing"},
		{"checkpoint of another VM", func(ev *evidence.Evidence, o *verify.Options) {
			rb, err := verify.Verify(clone(t, w.evB), opts(w, w.b, w.nonce))
			if err != nil {
				t.Fatal(err)
			}
			o.Checkpoint = rb.Checkpoint
		}, "belongs to another VM instance"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ev := clone(t, delta)
			o := opts(w, w.a, nonce)
			o.Checkpoint = cp
			tt.mutate(ev, &o)
			_, err := verify.Verify(ev, o)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want rejection %q", err, tt.want)
			}
		})
	}
}
