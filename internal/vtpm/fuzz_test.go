package vtpm_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// fuzzSeeds are real commands (from the QEMU guest run and the tests) and
// malformed ones.
func fuzzSeeds() [][]byte {
	d := make([]byte, 32)
	return [][]byte{
		{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x81},                                        // ReadClock
		{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0},                                  // Startup(CLEAR)
		{0x80, 0x01, 0, 0, 0, 11, 0, 0, 0x01, 0x43, 0},                                     // SelfTest
		{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7A, 0, 0, 0, 6, 0, 0, 1, 0x29, 0, 0, 0, 1}, // GetCapability
		{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7A, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 8},
		{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7E, 0, 0, 0, 1, 0, 0x0B, 3, 0, 4, 0}, // PCR_Read
		rawExtendWithSession(0x40000009, 10, d),
		rawExtendWithSession(0x02000000, 10, d),
		rawAllocate(nil, selBytes(vpcr.SHA1, false)),
		{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 0xFF},     // GetRandom
		{0x00, 0xC1, 0, 0, 0, 10, 0, 0, 0, 0xF1},                 // TPM 1.2
		{0x80, 0x02, 0, 0, 0, 14, 0, 0, 0x01, 0x82, 0, 0, 0, 10}, // truncated
		{0x80, 0x01, 0xFF, 0xFF, 0xFF, 0xFF},
	}
}

// checkResponse fails unless resp is a well-formed TPM response that fits
// the buffer.
func checkResponse(t *testing.T, cmd, resp []byte, buf uint32) {
	t.Helper()
	if len(resp) < 10 || len(resp) > int(buf) {
		t.Fatalf("cmd %x: response of %d bytes", cmd, len(resp))
	}
	if n := binary.BigEndian.Uint32(resp[2:6]); int(n) != len(resp) {
		t.Fatalf("cmd %x: size field %d, length %d", cmd, n, len(resp))
	}
	tag := binary.BigEndian.Uint16(resp)
	if tag != 0x8001 && tag != 0x8002 && tag != 0x00C4 {
		t.Fatalf("cmd %x: response tag %#x", cmd, tag)
	}
	if rc := binary.BigEndian.Uint32(resp[6:10]); rc != 0 && len(resp) != 10 {
		t.Fatalf("cmd %x: error %#x with a body", cmd, rc)
	}
}

// FuzzExecute feeds arbitrary bytes, as one TPM command at an arbitrary
// locality, to a running vTPM: it must answer a well-formed response that
// fits the buffer, never panic, and its vPCRs must stay the replay of its
// journal (only journaled changes happen).
func FuzzExecute(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s, uint8(0))
	}
	f.Add(rawExtendWithSession(0x40000009, 21, make([]byte, 32)), uint8(2))
	f.Fuzz(func(t *testing.T, cmd []byte, loc uint8) {
		j := &vtpmtest.Journal{}
		v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Now: func() time.Time { return time.Unix(0, 0) }}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		v.Init(ctx)
		v.SetBufferSize(1024)
		checkResponse(t, cmd, v.Execute(ctx, cmd), 1024) // maybe the Startup
		v.Execute(ctx, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0})
		v.SetLocality(loc % 5)
		resp := v.Execute(ctx, cmd)
		checkResponse(t, cmd, resp, 1024)
		replayed, err := vpcr.Replay(vtpm.DefaultBanks(), j.Events())
		if err != nil {
			t.Fatalf("journal does not replay: %v", err)
		}
		if !replayed.Equal(v.PCRs()) {
			t.Fatal("vPCRs differ from the journal replay")
		}
	})
}

// TestMalformedData: bad bytes on the data channel get a TPM error, never
// a hang, and the channel keeps working for the next command.
func TestMalformedData(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 8}
	ok := func() {
		t.Helper()
		if rc := respRC(t, r.raw, getRandom); rc != 0 {
			t.Fatalf("GetRandom after bad input: %#x", rc)
		}
	}
	tests := []struct {
		name string
		cmd  []byte
		rc   uint32
	}{
		{"bad tag", []byte{0x12, 0x34, 0, 0, 0, 10, 0, 0, 1, 0x7B}, 0x1E},
		{"size below a header", []byte{0x80, 0x01, 0, 0, 0, 4, 0, 0, 1, 0x7B}, 0x142},
		{"size above the buffer", append([]byte{0x80, 0x01, 0, 1, 0, 0, 0, 0, 1, 0x7B}, make([]byte, 100)...), 0x142},
		{"unknown command", []byte{0x80, 0x01, 0, 0, 0, 10, 0x20, 0, 0, 0}, 0x143},
		{"trailing parameter bytes", []byte{0x80, 0x01, 0, 0, 0, 14, 0, 0, 0x01, 0x7B, 0, 8, 1, 2}, 0x095},
		{"short parameters", []byte{0x80, 0x01, 0, 0, 0, 11, 0, 0, 0x01, 0x7B, 0}, 0x09A},
		{"sessions tag without auth area", []byte{0x80, 0x02, 0, 0, 0, 14, 0, 0, 0x01, 0x82, 0, 0, 0, 10}, 0x144},
		{"no session for PCR_Extend", []byte{0x80, 0x01, 0, 0, 0, 18, 0, 0, 0x01, 0x82, 0, 0, 0, 10, 0, 0, 0, 0}, 0x125},
		{"extend PCR 24", rawExtendWithSession(0x40000009, 24, make([]byte, 32)), 0x184},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if rc := respRC(t, r.raw, tc.cmd); rc != tc.rc {
				t.Fatalf("rc %#x, want %#x", rc, tc.rc)
			}
			ok()
		})
	}
	// A command cut short: after the partial-command timeout the guest gets
	// TPM_RC_COMMAND_SIZE; nothing hangs.
	start := time.Now()
	if rc := respRC(t, r.raw, getRandom[:6]); rc != 0x142 {
		t.Fatalf("truncated command: %#x", rc)
	}
	t.Logf("truncated command answered after %v", time.Since(start).Round(time.Millisecond))
	ok()
	// Two commands in one write (a pipelining peer) get two answers.
	two := append(append([]byte{}, getRandom...), getRandom...)
	if _, err := r.raw.Write(two); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if rc := respRC(t, r.raw, nil); rc != 0 {
			t.Fatalf("pipelined: %#x", rc)
		}
	}
	if !bytes.Equal(r.v.PCRs().Read(vpcr.SHA256, 10), make([]byte, 32)) {
		t.Fatal("bad input changed PCR 10")
	}
}
