package verify_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// TestEpochBoundToPowerCycle: a log whose epoch record does not belong to
// the TPM power cycle and AK of the quote is rejected, though the TPM
// genuinely extended and quoted it. These are the forms a re-rooted or
// replayed history takes (host root after the fact).
func TestEpochBoundToPowerCycle(t *testing.T) {
	w := getWorld(t)
	ident, err := conceal.NewIdentity([16]byte{0xc1})
	if err != nil {
		t.Fatal(err)
	}
	gen := &record.Record{Kind: record.KindGenesis, Genesis: &record.Genesis{UUID: ident.UUID, Instance: ident.Instance, Name: "vm-e"}}
	tests := []struct {
		name   string
		pcr    int
		mutate func(*record.Epoch)
		allow  bool
		want   string
	}{
		{"another resetCount", 1, func(e *record.Epoch) { e.ResetCount++ }, false, "resetCount"},
		{"another restartCount", 2, func(e *record.Epoch) { e.RestartCount++ }, false, "restartCount"},
		{"clock ahead of the quote", 3, func(e *record.Epoch) { e.Clock += 1 << 40 }, false, "the TPM was cleared"},
		{"another AK", 4, func(e *record.Epoch) { e.AK[0] ^= 1 }, false, "not the trusted AK"},
		{"start value not the PCR's", 5, func(e *record.Epoch) { e.StartValue[0] ^= 1 }, false, "replays to"},
		{"resettable PCR 16", 16, nil, false, "can be reset without a reboot"},
		{"resettable PCR 23, allowed for tests", 23, nil, true, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nonce := []byte(tt.name + " nonce of the verifier")
			ev := forgeEpoch(t, w.tpm, tt.pcr, ident, []*record.Record{gen}, nonce, tt.mutate)
			o := opts(w, ident, nonce)
			o.PCR, o.AllowResettablePCR = tt.pcr, tt.allow
			_, err := verify.Verify(ev, o)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("rejected: %v", err)
				}
				return
			}
			if !verify.IsRejection(err) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want a rejection saying %q", err, tt.want)
			}
		})
	}
}

// TestHighWaterMark: a verifier that verified A before keeps a checkpoint;
// evidence that later shows less of A's history (the shape a reset and
// re-extended PCR gives), is from an older TPM clock, or from another
// epoch, is rejected; evidence that shows more is accepted.
func TestHighWaterMark(t *testing.T) {
	w := getWorld(t)
	later, err := verify.Verify(clone(t, w.evAEnd), opts(w, w.a, w.nonceE))
	if err != nil {
		t.Fatal(err)
	}
	earlier, err := verify.Verify(clone(t, w.evA), opts(w, w.a, w.nonce))
	if err != nil {
		t.Fatal(err)
	}
	if later.Checkpoint.Records <= earlier.Checkpoint.Records {
		t.Fatalf("fixture: later evidence has %d records, earlier %d", later.Checkpoint.Records, earlier.Checkpoint.Records)
	}

	// Forward: full evidence that extends what was seen is fine.
	o := opts(w, w.a, w.nonceE)
	o.Checkpoint = earlier.Checkpoint
	if _, err := verify.Verify(clone(t, w.evAEnd), o); err != nil {
		t.Fatalf("newer full evidence rejected with the older checkpoint: %v", err)
	}
	// Back: the older (shorter) history after the newer one was seen.
	o = opts(w, w.a, w.nonce)
	o.Checkpoint = later.Checkpoint
	_, err = verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("shorter history after a longer one: got %v, want a rollback rejection", err)
	}
	// The record count alone (same clock) is enough.
	cp := *later.Checkpoint
	cp.Clock = earlier.Checkpoint.Clock
	o.Checkpoint = &cp
	_, err = verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "history was truncated") {
		t.Fatalf("got %v, want rejection naming the truncation", err)
	}
	// An older TPM clock alone is enough.
	cp = *earlier.Checkpoint
	cp.Clock += 1 << 40
	o.Checkpoint = &cp
	_, err = verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "clock") {
		t.Fatalf("got %v, want rejection naming the clock", err)
	}
	// Another power cycle.
	cp = *earlier.Checkpoint
	cp.ResetCount++
	o.Checkpoint = &cp
	_, err = verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "resetCount") {
		t.Fatalf("got %v, want rejection naming resetCount", err)
	}
}

// TestCheckpointOnlyWhenTrusted: a report rejected by policy carries no
// checkpoint, so a verifier cannot save one past the violations and skip
// them next time.
func TestCheckpointOnlyWhenTrusted(t *testing.T) {
	w := getWorld(t)
	o := opts(w, w.a, w.nonce)
	o.Appraise = func(m *record.Measurement) []verify.Violation {
		return []verify.Violation{{Reason: "not in policy"}}
	}
	rep, err := verify.Verify(clone(t, w.evA), o)
	if !verify.IsRejection(err) {
		t.Fatalf("got %v, want a policy rejection", err)
	}
	if rep.Checkpoint != nil {
		t.Fatal("rejected report carries a checkpoint")
	}
	rep, err = verify.Verify(clone(t, w.evA), opts(w, w.a, w.nonce))
	if err != nil || rep.Checkpoint == nil {
		t.Fatalf("trusted report: err %v, checkpoint %v", err, rep.Checkpoint)
	}
}

// TestNonceLength: a nonce shorter than MinNonce is a usage error, not a
// verdict.
func TestNonceLength(t *testing.T) {
	w := getWorld(t)
	for _, n := range [][]byte{{1}, []byte("fifteen bytes!!")} {
		_, err := verify.Verify(clone(t, w.evA), opts(w, w.a, n))
		if err == nil || verify.IsRejection(err) {
			t.Fatalf("nonce of %d bytes: got %v, want a usage error", len(n), err)
		}
	}
}

// TestExpectUUID: B's genuine evidence with B's genuine identity passes on
// its own, but not for a verifier that means to attest A.
func TestExpectUUID(t *testing.T) {
	w := getWorld(t)
	o := opts(w, w.b, w.nonce)
	if _, err := verify.Verify(clone(t, w.evB), o); err != nil {
		t.Fatal(err)
	}
	o.ExpectUUID = w.a.UUID
	_, err := verify.Verify(clone(t, w.evB), o)
	var rj *verify.Rejection
	if !errors.As(err, &rj) || !strings.Contains(err.Error(), "another VM's evidence") {
		t.Fatalf("got %v, want a rejection", err)
	}
	o.ExpectUUID = w.b.UUID
	if _, err := verify.Verify(clone(t, w.evB), o); err != nil {
		t.Fatalf("expected uuid rejected: %v", err)
	}
}
