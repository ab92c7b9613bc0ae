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
	if tag != 0x8001 && tag != 0x8002 {
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
		// OVMF's TPM 1.2 probe (GetTicks) over TIS: a TPM 2.0 header, or
		// OVMF takes the vTPM for a TPM 1.2 (respRC checks the tag).
		{"TPM 1.2 GetTicks", []byte{0x00, 0xC1, 0, 0, 0, 10, 0, 0, 0, 0xF1}, 0x1E},
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
			resp := roundTrip(t, r.raw, tc.cmd)
			if tag, rc := binary.BigEndian.Uint16(resp), binary.BigEndian.Uint32(resp[6:10]); tag != 0x8001 || rc != tc.rc {
				t.Fatalf("tag %#x rc %#x, want tag 0x8001 rc %#x", tag, rc, tc.rc)
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

// FuzzControl feeds arbitrary bytes, as a peer other than QEMU might send
// them, to the control channel: ServeControl must answer or close, never
// panic or hang, and nothing but a well-formed CMD_INIT may touch the
// journal.
func FuzzControl(f *testing.F) {
	be := func(v ...uint32) []byte {
		var b []byte
		for _, x := range v {
			b = binary.BigEndian.AppendUint32(b, x)
		}
		return b
	}
	for _, s := range [][]byte{
		be(1), be(2, 0), be(3), be(4), append(be(5), 2, 0, 0, 0), be(6), be(7, 3), be(8), be(9), be(10),
		append(be(11), 3, 0, 0, 0), be(12, 0, 2, 0), be(13, 0, 2, 10), be(14), be(15), be(16), be(17, 3968),
		be(99), {0, 0}, be(7, 0xFFFFFFFF), be(13, 0, 1, 0xFFFFFFFF),
		append(be(17, 0), be(1)...), // two commands in one write
		// A migration's destination: stop, the state blobs, the resume.
		append(append(be(14, 13, 0, 2, 29), []byte("tpmmux-vtpm-v1\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x07")...), be(2, 1)...),
		be(13, 0, 1, 4097),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		j := &vtpmtest.Journal{}
		// Inputs ending in an odd byte run against a vTPM of a VM that is
		// migrating in, which must journal nothing at all.
		incoming := len(in) > 0 && in[len(in)-1]&1 == 1
		v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Incoming: incoming}, nil)
		if err != nil {
			t.Fatal(err)
		}
		peer, bridge := unixPair(t)
		done := make(chan error, 1)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() { done <- v.ServeControl(ctx, bridge) }()
		go func() {
			peer.Write(in)
			peer.CloseWrite()
			// Drain answers so the server never blocks on a full buffer.
			buf := make([]byte, 4096)
			for {
				if _, err := peer.Read(buf); err != nil {
					return
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("ServeControl did not finish on %x", in)
		}
		for _, e := range j.Events() {
			if e.Kind != vpcr.KindInit || incoming {
				t.Fatalf("control bytes journaled %v (incoming %v)", e, incoming)
			}
		}
	})
}
