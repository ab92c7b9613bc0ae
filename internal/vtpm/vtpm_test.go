package vtpm_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"golang.org/x/sys/unix"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// socketPair returns two connected unix stream sockets, as QEMU makes for
// the data channel.
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "pair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// rig is a vTPM with an in-memory journal, powered on (CMD_INIT) and served
// on a data socket whose client end is tpm.
type rig struct {
	v   *vtpm.VTPM
	j   *vtpmtest.Journal
	tpm transport.TPM
	raw net.Conn
}

func newRig(t testing.TB, banks []vpcr.Alg, past []vpcr.Event) *rig {
	t.Helper()
	j := &vtpmtest.Journal{}
	v, err := vtpm.New(vtpm.Config{Banks: banks, Journal: j, Logger: quietLog()}, past)
	if err != nil {
		t.Fatal(err)
	}
	client, server := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- v.ServeData(ctx, server) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("ServeData: %v", err)
		}
	})
	return &rig{v: v, j: j, tpm: transport.FromReadWriter(client), raw: client}
}

func (r *rig) powerOn(t testing.TB) {
	t.Helper()
	if rc := r.v.Init(context.Background()); rc != 0 {
		t.Fatalf("Init: %#x", rc)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(r.tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
}

func pcrSel(alg tpm2.TPMAlgID, pcrs ...uint) tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: alg, PCRSelect: tpm2.PCClientCompatible.PCRs(pcrs...)}}}
}

func (r *rig) read(t testing.TB, alg tpm2.TPMAlgID, pcr uint) []byte {
	t.Helper()
	rsp, err := (tpm2.PCRRead{PCRSelectionIn: pcrSel(alg, pcr)}).Execute(r.tpm)
	if err != nil {
		t.Fatalf("PCR_Read %v/%d: %v", alg, pcr, err)
	}
	if len(rsp.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read %v/%d: %d digests", alg, pcr, len(rsp.PCRValues.Digests))
	}
	return rsp.PCRValues.Digests[0].Buffer
}

func extendCmd(pcr uint32, d256 []byte) tpm2.PCRExtend {
	return tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d256}}},
	}
}

func extendOf(old, d []byte) []byte {
	h := sha256.New()
	h.Write(old)
	h.Write(d)
	return h.Sum(nil)
}

// TestGoTPMClient drives the data channel with go-tpm's TPM 2.0 client:
// the commands a measured-boot guest uses, answered as a TPM would, every
// extend journaled before the guest sees success, and the vPCRs equal to
// the replay of the journal.
func TestGoTPMClient(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)

	// Capabilities the Linux driver reads: TOTAL_COMMANDS must equal the
	// number of TPMA_CCs GetCapability(COMMANDS) returns.
	props, err := (tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTTotalCommands), PropertyCount: 1}).Execute(r.tpm)
	if err != nil {
		t.Fatal(err)
	}
	tp, err := props.CapabilityData.Data.TPMProperties()
	if err != nil || len(tp.TPMProperty) != 1 || tp.TPMProperty[0].Property != tpm2.TPMPTTotalCommands {
		t.Fatalf("TOTAL_COMMANDS: %+v %v", tp, err)
	}
	cmds, err := (tpm2.GetCapability{Capability: tpm2.TPMCapCommands, Property: 0x11F, PropertyCount: tp.TPMProperty[0].Value}).Execute(r.tpm)
	if err != nil {
		t.Fatal(err)
	}
	cc, _ := cmds.CapabilityData.Data.Command()
	if uint32(len(cc.CommandAttributes)) != tp.TPMProperty[0].Value || cmds.MoreData {
		t.Fatalf("COMMANDS returned %d, TOTAL_COMMANDS says %d", len(cc.CommandAttributes), tp.TPMProperty[0].Value)
	}
	pcrs, err := (tpm2.GetCapability{Capability: tpm2.TPMCapPCRs, PropertyCount: 8}).Execute(r.tpm)
	if err != nil {
		t.Fatal(err)
	}
	sel, _ := pcrs.CapabilityData.Data.AssignedPCR()
	if len(sel.PCRSelections) != 2 || sel.PCRSelections[0].Hash != tpm2.TPMAlgSHA1 || sel.PCRSelections[1].Hash != tpm2.TPMAlgSHA256 ||
		!bytes.Equal(sel.PCRSelections[1].PCRSelect, []byte{0xff, 0xff, 0xff}) {
		t.Fatalf("PCRS: %+v", sel)
	}

	// Initial values: zero, except the D-RTM PCRs 17-22 (all ones).
	if got := r.read(t, tpm2.TPMAlgSHA256, 10); !bytes.Equal(got, make([]byte, 32)) {
		t.Fatalf("PCR 10 after startup: %x", got)
	}
	if got := r.read(t, tpm2.TPMAlgSHA256, 17); !bytes.Equal(got, bytes.Repeat([]byte{0xff}, 32)) {
		t.Fatalf("PCR 17 after startup: %x", got)
	}

	d := sha256.Sum256([]byte("measured file"))
	if _, err := extendCmd(10, d[:]).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	want := extendOf(make([]byte, 32), d[:])
	if got := r.read(t, tpm2.TPMAlgSHA256, 10); !bytes.Equal(got, want) {
		t.Fatalf("PCR 10 = %x, want %x", got, want)
	}
	// The sha1 bank was not in the PCR_Extend: unchanged, as on hardware.
	if got := r.read(t, tpm2.TPMAlgSHA1, 10); !bytes.Equal(got, make([]byte, 20)) {
		t.Fatalf("sha1 PCR 10 changed by a sha256-only extend: %x", got)
	}
	// PCR_Event hashes the data with every bank and extends.
	ev := tpm2.PCREvent{PCRHandle: tpm2.AuthHandle{Handle: 11, Auth: tpm2.PasswordAuth(nil)}, EventData: tpm2.TPM2BEvent{Buffer: []byte("event")}}
	if _, err := ev.Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	de := sha256.Sum256([]byte("event"))
	if got := r.read(t, tpm2.TPMAlgSHA256, 11); !bytes.Equal(got, extendOf(make([]byte, 32), de[:])) {
		t.Fatalf("PCR 11 after PCR_Event: %x", got)
	}

	rnd, err := (tpm2.GetRandom{BytesRequested: 200}).Execute(r.tpm)
	if err != nil || len(rnd.RandomBytes.Buffer) != 64 {
		t.Fatalf("GetRandom(200): %d bytes, %v (want the largest digest, 64)", len(rnd.RandomBytes.Buffer), err)
	}

	// Journal: init, startup, extend, event; the vPCRs are their replay.
	evs := r.j.Events()
	kinds := []vpcr.Kind{}
	for _, e := range evs {
		kinds = append(kinds, e.Kind)
	}
	if !slices.Equal(kinds, []vpcr.Kind{vpcr.KindInit, vpcr.KindStartup, vpcr.KindExtend, vpcr.KindExtend}) {
		t.Fatalf("journal kinds %v", kinds)
	}
	if e := evs[2]; e.PCR != 10 || e.Locality != 0 || e.Command != uint32(tpm2.TPMCCPCRExtend) || len(e.Digests) != 1 || !bytes.Equal(e.Digests[0].Value, d[:]) {
		t.Fatalf("extend record %v", e)
	}
	if e := evs[3]; len(e.Digests) != 2 || e.Command != uint32(tpm2.TPMCCPCREvent) || string(e.Data) != "event" {
		t.Fatalf("PCR_Event record %v (want one digest per active bank and the data)", e)
	}
	replayed, err := vpcr.Replay(vtpm.DefaultBanks(), evs)
	if err != nil {
		t.Fatal(err)
	}
	if !replayed.Equal(r.v.PCRs()) {
		t.Fatal("live vPCRs differ from the replay of the journal")
	}
}

// TestStateRules: the TPM's own state rules hold against the guest.
func TestStateRules(t *testing.T) {
	r := newRig(t, nil, nil)
	// Before CMD_INIT: TPM_RC_FAILURE with a TPM 2.0 tag (QEMU's probe).
	if _, err := (tpm2.ReadClock{}).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCFailure) {
		t.Fatalf("ReadClock before INIT: %v, want TPM_RC_FAILURE", err)
	}
	if rc := r.v.Init(context.Background()); rc != 0 {
		t.Fatal(rc)
	}
	// Between INIT and Startup everything but Startup is TPM_RC_INITIALIZE.
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatalf("GetRandom before Startup: %v", err)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	for _, pcr := range []uint32{10, 16, 23} {
		if _, err := extendCmd(pcr, d[:]).Execute(r.tpm); err != nil {
			t.Fatal(err)
		}
	}
	before := r.v.PCRs()
	// A second Startup(CLEAR), e.g. from guest user space through
	// /dev/tpm0, resets nothing.
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatalf("second Startup: %v, want TPM_RC_INITIALIZE", err)
	}
	if !before.Equal(r.v.PCRs()) {
		t.Fatal("a second Startup changed the vPCRs")
	}

	reset := func(pcr uint32) error {
		_, err := (tpm2.PCRReset{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)}}).Execute(r.tpm)
		return err
	}
	// PC-client: 0-15 never resettable; 17-22 not at locality 0; 16, 23 yes.
	for pcr := uint32(0); pcr < 24; pcr++ {
		err := reset(pcr)
		if pcr == 16 || pcr == 23 {
			if err != nil {
				t.Fatalf("PCR_Reset(%d) at locality 0: %v", pcr, err)
			}
			if got := r.read(t, tpm2.TPMAlgSHA256, uint(pcr)); !bytes.Equal(got, make([]byte, 32)) {
				t.Fatalf("PCR %d after reset: %x", pcr, got)
			}
			continue
		}
		if !errors.Is(err, tpm2.TPMRCLocality) {
			t.Fatalf("PCR_Reset(%d) at locality 0: %v, want TPM_RC_LOCALITY", pcr, err)
		}
	}
	if got := r.read(t, tpm2.TPMAlgSHA256, 10); !bytes.Equal(got, extendOf(make([]byte, 32), d[:])) {
		t.Fatal("PCR 10 changed by refused resets")
	}
	// Locality: PCR 21 extends only from locality 2.
	if _, err := extendCmd(21, d[:]).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCLocality) {
		t.Fatalf("extend PCR 21 at locality 0: %v", err)
	}
	if rc := r.v.SetLocality(2); rc != 0 {
		t.Fatal(rc)
	}
	if _, err := extendCmd(21, d[:]).Execute(r.tpm); err != nil {
		t.Fatalf("extend PCR 21 at locality 2: %v", err)
	}
	if e := r.j.Events(); e[len(e)-1].Locality != 2 || e[len(e)-1].PCR != 21 {
		t.Fatalf("last record %v, want PCR 21 at locality 2", e[len(e)-1])
	}
	if rc := r.v.SetLocality(5); rc == 0 {
		t.Fatal("SetLocality(5) accepted")
	}
	r.v.SetLocality(0)

	// Only password sessions: an HMAC session handle is not loaded.
	raw := rawExtendWithSession(0x02000000, 10, d[:])
	if rc := respRC(t, r.raw, raw); rc != 0x910 {
		t.Fatalf("extend with HMAC session handle: rc %#x, want TPM_RC_REFERENCE_S0", rc)
	}
	// A wrong PCR password.
	bad := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: 10, Auth: tpm2.PasswordAuth([]byte("nope"))},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}
	if _, err := bad.Execute(r.tpm); !errors.Is(err, tpm2.TPMRCAuthFail) {
		t.Fatalf("extend with a wrong password: %v", err)
	}
	// Not implemented: TPM_RC_COMMAND_CODE, not a hang.
	if _, err := (tpm2.Clear{AuthHandle: tpm2.TPMRHPlatform}).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCCommandCode) {
		t.Fatalf("Clear: %v, want TPM_RC_COMMAND_CODE", err)
	}
	if _, err := (tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}).Execute(r.tpm); !errors.Is(err, tpm2.TPMRCCommandCode) {
		t.Fatalf("CreatePrimary: %v, want TPM_RC_COMMAND_CODE", err)
	}
	// Platform auth: SeaBIOS sets a random one; then the empty one fails.
	if _, err := (tpm2.HierarchyChangeAuth{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}, NewAuth: tpm2.TPM2BAuth{Buffer: []byte("pw")}}).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	if rc := respRC(t, r.raw, rawAllocate(nil, selBytes(vpcr.SHA1, true))); rc != 0x98E {
		t.Fatalf("PCR_Allocate with the old platform auth: rc %#x, want TPM_RC_AUTH_FAIL", rc)
	}
}

// selBytes is a TPMS_PCR_SELECTION of all or none of the PCRs of alg.
func selBytes(alg vpcr.Alg, all bool) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(alg))
	if all {
		return append(b, 3, 0xff, 0xff, 0xff)
	}
	return append(b, 3, 0, 0, 0)
}

// rawAllocate is a PCR_Allocate on the platform hierarchy with password pw.
func rawAllocate(pw []byte, sels ...[]byte) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint16(b, 0x8002)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint32(b, 0x12B)
	b = binary.BigEndian.AppendUint32(b, 0x4000000C)
	b = binary.BigEndian.AppendUint32(b, uint32(9+len(pw)))
	b = binary.BigEndian.AppendUint32(b, 0x40000009)
	b = append(b, 0, 0, 1)
	b = binary.BigEndian.AppendUint16(b, uint16(len(pw)))
	b = append(b, pw...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(sels)))
	for _, s := range sels {
		b = append(b, s...)
	}
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// rawExtendWithSession is a PCR_Extend of one sha256 digest with a session
// of the given handle.
func rawExtendWithSession(sh, pcr uint32, d []byte) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint16(b, 0x8002)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint32(b, 0x182)
	b = binary.BigEndian.AppendUint32(b, pcr)
	b = binary.BigEndian.AppendUint32(b, 9)
	b = binary.BigEndian.AppendUint32(b, sh)
	b = append(b, 0, 0, 1, 0, 0)
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint16(b, 0x000B)
	b = append(b, d...)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// respRC sends raw bytes and returns the response code.
func respRC(t testing.TB, c net.Conn, cmd []byte) uint32 {
	t.Helper()
	resp := roundTrip(t, c, cmd)
	return binary.BigEndian.Uint32(resp[6:10])
}

// roundTrip writes cmd and reads one whole response.
func roundTrip(t testing.TB, c net.Conn, cmd []byte) []byte {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(cmd); err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatalf("read response header: %v", err)
	}
	n := binary.BigEndian.Uint32(hdr[2:6])
	if n < 10 || n > 4096 {
		t.Fatalf("response size %d", n)
	}
	rest := make([]byte, n-10)
	if _, err := io.ReadFull(c, rest); err != nil {
		t.Fatal(err)
	}
	return append(hdr, rest...)
}

// TestRestoreFromJournal: a vTPM built from the journal of a running one
// (a bridge restart) has the same vPCRs and phase, serves the guest's next
// commands on, and refuses a second Startup.
func TestRestoreFromJournal(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)
	for i := range 5 {
		d := sha256.Sum256([]byte{byte(i)})
		if _, err := extendCmd(10, d[:]).Execute(r.tpm); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := (tpm2.PCRReset{PCRHandle: tpm2.AuthHandle{Handle: 23, Auth: tpm2.PasswordAuth(nil)}}).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	past := r.j.Events()

	r2 := newRig(t, nil, past)
	if !r2.v.PCRs().Equal(r.v.PCRs()) {
		t.Fatal("restored vPCRs differ")
	}
	// The restored vTPM is running: no INIT, no Startup needed, and a
	// Startup is refused.
	if got, want := r2.read(t, tpm2.TPMAlgSHA256, 10), r.read(t, tpm2.TPMAlgSHA256, 10); !bytes.Equal(got, want) {
		t.Fatalf("restored PCR 10 %x, want %x", got, want)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(r2.tpm); !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatalf("Startup on the restored vTPM: %v", err)
	}
	d := sha256.Sum256([]byte("after restart"))
	if _, err := extendCmd(10, d[:]).Execute(r2.tpm); err != nil {
		t.Fatal(err)
	}
	if seq := r2.j.Events()[0].Seq; seq != uint64(len(past))+1 {
		t.Fatalf("first event after restore has seq %d, want %d", seq, len(past)+1)
	}
	// A journal cut between INIT and Startup restores a TPM that waits
	// for Startup.
	var cut []vpcr.Event
	for _, e := range past {
		cut = append(cut, e)
		if e.Kind == vpcr.KindInit {
			break
		}
	}
	r3 := newRig(t, nil, cut)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(r3.tpm); err != nil {
		t.Fatalf("Startup after a restore at INIT: %v", err)
	}
	// A journal that breaks the rules is refused.
	bad := slices.Clone(past)
	bad[3].PCR = 99
	if _, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}}, bad); err == nil {
		t.Fatal("restore accepted an event for PCR 99")
	}
}

// TestRebootRecord: INIT + Startup(CLEAR) is a reboot: the vPCRs go back to
// their initial values and the journal holds the reboot.
func TestRebootRecord(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)
	d := sha256.Sum256([]byte("boot 1"))
	if _, err := extendCmd(4, d[:]).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	r.powerOn(t) // QEMU's machine reset: CMD_INIT, then the firmware's Startup
	if got := r.read(t, tpm2.TPMAlgSHA256, 4); !bytes.Equal(got, make([]byte, 32)) {
		t.Fatalf("PCR 4 after reboot: %x", got)
	}
	evs := r.j.Events()
	last := evs[len(evs)-2:]
	if last[0].Kind != vpcr.KindInit || last[1].Kind != vpcr.KindStartup || !slices.Equal(last[1].Banks, vtpm.DefaultBanks()) {
		t.Fatalf("reboot records %v", last)
	}
	if r.v.PCRs().ResetCount() != 2 {
		t.Fatalf("reset count %d", r.v.PCRs().ResetCount())
	}
}

// TestJournalGatesTheGuest: the guest's extend returns only after the
// journal returned; a failing journal changes nothing and the guest gets
// TPM_RC_RETRY.
func TestJournalGatesTheGuest(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)
	d := sha256.Sum256([]byte("slow"))
	r.j.SetDelay(150 * time.Millisecond)
	start := time.Now()
	if _, err := extendCmd(10, d[:]).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("extend answered after %v, before the journal returned", el)
	}
	r.j.SetDelay(0)
	before := r.v.PCRs()
	n := len(r.j.Events())
	r.j.SetFail(errors.New("store full"))
	// (go-tpm retries TPM_RC_RETRY itself, as the Linux driver does, so
	// look at the raw answer.)
	if rc := respRC(t, r.raw, rawExtendWithSession(0x40000009, 10, d[:])); rc != 0x922 {
		t.Fatalf("extend with a failing journal: rc %#x, want TPM_RC_RETRY", rc)
	}
	if !before.Equal(r.v.PCRs()) || len(r.j.Events()) != n {
		t.Fatal("a refused journal append changed the vPCRs")
	}
	r.j.SetFail(nil)
	if _, err := extendCmd(10, d[:]).Execute(r.tpm); err != nil {
		t.Fatal(err)
	}
}

// TestPCRAllocate: a PCR_Allocate (OVMF, SeaBIOS's menu) is journaled and
// takes effect at the next reboot only; banks not configured are refused.
func TestPCRAllocate(t *testing.T) {
	r := newRig(t, []vpcr.Alg{vpcr.SHA1, vpcr.SHA256, vpcr.SHA384}, nil)
	r.powerOn(t)
	alloc := func(sels ...[]byte) bool {
		t.Helper()
		resp := roundTrip(t, r.raw, rawAllocate(nil, sels...))
		if rc := binary.BigEndian.Uint32(resp[6:10]); rc != 0 {
			t.Fatalf("PCR_Allocate: rc %#x", rc)
		}
		return resp[14] == 1 // after the parameterSize: allocationSuccess
	}
	if !alloc(selBytes(vpcr.SHA1, false), selBytes(vpcr.SHA384, true)) {
		t.Fatal("allocation refused")
	}
	if got := r.v.PCRs().Active(); !slices.Equal(got, []vpcr.Alg{vpcr.SHA1, vpcr.SHA256, vpcr.SHA384}) {
		t.Fatalf("active before reboot: %v", got)
	}
	r.powerOn(t)
	if got := r.v.PCRs().Active(); !slices.Equal(got, []vpcr.Alg{vpcr.SHA256, vpcr.SHA384}) {
		t.Fatalf("active after reboot: %v", got)
	}
	if alloc(selBytes(vpcr.SHA512, true)) {
		t.Fatal("allocation of an unconfigured bank (sha512) succeeded")
	}
	// A partial bank is refused with TPM_RC_VALUE (parameter 1).
	partial := append(binary.BigEndian.AppendUint16(nil, uint16(vpcr.SHA256)), 3, 0xff, 0, 0)
	if rc := respRC(t, r.raw, rawAllocate(nil, partial)); rc != 0x1C4 {
		t.Fatalf("partial allocation: rc %#x", rc)
	}
	replayed, err := vpcr.Replay([]vpcr.Alg{vpcr.SHA1, vpcr.SHA256, vpcr.SHA384}, r.j.Events())
	if err != nil || !replayed.Equal(r.v.PCRs()) {
		t.Fatalf("replay after allocate: %v", err)
	}
}

// rawHierarchyControl is TPM2_HierarchyControl(auth, enable, state) with an
// empty password.
func rawHierarchyControl(auth, enable uint32, state byte) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint16(b, 0x8002)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint32(b, 0x121)
	b = binary.BigEndian.AppendUint32(b, auth)
	b = binary.BigEndian.AppendUint32(b, 9)
	b = binary.BigEndian.AppendUint32(b, 0x40000009)
	b = append(b, 0, 0, 1, 0, 0)
	b = binary.BigEndian.AppendUint32(b, enable)
	b = append(b, state)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

// TestHierarchyControl: who may turn which hierarchy off or on, that a
// disabled hierarchy's handle is refused, and that a reboot enables all.
func TestHierarchyControl(t *testing.T) {
	r := newRig(t, nil, nil)
	r.powerOn(t)
	const owner, endorsement, platform = 0x40000001, 0x4000000B, 0x4000000C
	changeOwnerAuth := func() error {
		_, err := (tpm2.HierarchyChangeAuth{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}, NewAuth: tpm2.TPM2BAuth{}}).Execute(r.tpm)
		return err
	}
	tests := []struct {
		name         string
		auth, enable uint32
		state        byte
		rc           uint32
	}{
		{"owner disables endorsement", owner, endorsement, 0, 0},
		{"owner may not enable", owner, endorsement, 1, 0x1A4}, // TPM_RC_AUTH_TYPE, handle 1
		{"owner may not touch platform", owner, platform, 0, 0x1A4},
		{"platform enables endorsement", platform, endorsement, 1, 0},
		{"platform disables owner", platform, owner, 0, 0},
		{"owner handle now disabled", owner, endorsement, 0, 0x185}, // TPM_RC_HIERARCHY, handle 1
		{"bad enable", platform, 0x40000007, 0, 0x1C4},
		{"bad state", platform, owner, 2, 0x2C4},
	}
	for _, tc := range tests {
		if rc := respRC(t, r.raw, rawHierarchyControl(tc.auth, tc.enable, tc.state)); rc != tc.rc {
			t.Errorf("%s: rc %#x, want %#x", tc.name, rc, tc.rc)
		}
	}
	if err := changeOwnerAuth(); !errors.Is(err, tpm2.TPMRCHierarchy) {
		t.Fatalf("HierarchyChangeAuth(owner) with the owner hierarchy off: %v", err)
	}
	r.powerOn(t) // a reboot enables every hierarchy again
	if err := changeOwnerAuth(); err != nil {
		t.Fatalf("HierarchyChangeAuth(owner) after a reboot: %v", err)
	}
}
