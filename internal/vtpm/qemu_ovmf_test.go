package vtpm_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/record"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/guestboot"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
)

// The OVMF test boots a disk the way a UEFI VM boots: OVMF (UEFI firmware,
// measured boot through its Tcg2 driver) -> GRUB from the disk's EFI system
// partition (with its tpm module: commands and the kernel command line
// into PCR 8, the files it loads into PCR 9) -> the e2e guest kernel (its
// EFI stub) with IMA on the vTPM. scripts/e2e/build-uefi-disk.sh builds the
// disk; its init prints the guest's PCRs 0-10 in both banks, the firmware
// event log the kernel got from UEFI, and its IMA list.
//
// Needs what TestQEMUGuestIMA needs plus OVMF, GRUB's EFI modules, mtools,
// dosfstools and sfdisk (scripts/setup.sh ovmf). Skipped otherwise and
// with -short; CI fails on the skip.

// ovmfCode and ovmfVars are Debian's OVMF (package ovmf), the 4 MiB build
// without Secure Boot that libvirt's firmware auto-selection also finds.
const (
	ovmfCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	ovmfVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// ovmfInit is the OVMF guest's /init.
const ovmfInit = guestboot.Prelude + `echo "VTPM-TEST: start"
if cat /etc/ima-policy >/sys/kernel/security/ima/policy; then echo "VTPM-TEST: policy loaded"; fi
for t in /opt/vtpm/tool-*; do "$t"; done
cat /opt/vtpm/data >/dev/null
ls /sys/class/tpm/ | sed 's/^/VTPM-TEST: tpm-dev /'
dmesg | grep -i -E 'tpm|ima|efi: ' | sed 's/^/VTPM-TEST: dmesg /'
for b in sha1 sha256 sha384 sha512; do
  [ -d /sys/class/tpm/tpm0/pcr-$b ] || continue
  for i in 0 1 2 3 4 5 6 7 8 9; do
    echo "VTPM-TEST: pcr $b $i $(cat /sys/class/tpm/tpm0/pcr-$b/$i)"
  done
done
base64 /sys/kernel/security/tpm0/binary_bios_measurements | sed 's/^/VTPM-TEST: evlog /'
a=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
cp /sys/kernel/security/ima/binary_runtime_measurements /run/ima.bin
b=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
echo "VTPM-TEST: pcr10-sha256 $a $b"
base64 /run/ima.bin | sed 's/^/VTPM-TEST: b64 /'
echo "VTPM-TEST: done"
poweroff -f
`

// TestQEMUOVMFMeasuredBoot boots OVMF -> GRUB -> Linux with IMA on the
// vTPM and checks that the firmware's and GRUB's extends are the VM's
// records: every extend of the firmware event log the guest kernel holds
// is a journaled record, in order, with both banks' digests; GRUB's
// kernel command line is in PCR 8 and the kernel and initrd it loaded are
// in PCR 9; the guest's own PCRs 0-9 (both banks) equal the replay of the
// records; boot_aggregate is their digest; IMA ran on the TPM.
func TestQEMUOVMFMeasuredBoot(t *testing.T) {
	for _, c := range []struct {
		model string
		banks []vpcr.Alg
	}{
		{"tpm-crb", vtpm.DefaultBanks()},
		{"tpm-tis", []vpcr.Alg{vpcr.SHA1, vpcr.SHA256, vpcr.SHA384, vpcr.SHA512}},
	} {
		t.Run(c.model, func(t *testing.T) { testQEMUOVMF(t, c.model, c.banks) })
	}
}

// ovmfBoot is what one OVMF boot produced.
type ovmfBoot struct {
	events  []vpcr.Event            // the vTPM's journal
	state   *vpcr.State             // the replay of events
	guest   map[vpcr.Alg][10][]byte // the guest's own PCRs 0-9 (sysfs)
	evlog   []tcgEvent
	ima     []ima.Entry
	cmdline string
	kernel  []byte
	initrd  []byte
	tr      *traceLog
	took    time.Duration
	mux     *mux.Mux          // the multiplexer that holds the VM's records
	ident   *conceal.Identity // the VM's
	loader  []byte            // sha256 of the OVMF build (the launch's loader)
	sent    bool              // the IMA list is in the log as the agent's entries
}

func testQEMUOVMF(t *testing.T, model string, banks []vpcr.Alg) {
	b := bootOVMF(t, model, banks)
	t.Logf("OVMF -> GRUB -> Linux to power-off in %v", b.took.Round(10*time.Millisecond))
	checkOVMFBoot(t, b, model, banks, true)
}

// lastBoot returns the events from the last Startup on.
func lastBoot(events []vpcr.Event) []vpcr.Event {
	for i := len(events) - 1; i >= 0; i-- {
		if events[i].Kind == vpcr.KindStartup {
			return events[i:]
		}
	}
	return nil
}

// checkOVMFBoot checks the guest's last boot, whose active banks are
// banks, against the vTPM's records of it; with pins, also the evidence
// under a launch policy that pins the boot.
func checkOVMFBoot(t *testing.T, b *ovmfBoot, model string, banks []vpcr.Alg, pins bool) {
	t.Helper()
	last := lastBoot(b.events)

	// Per PCR, the journaled extends (firmware, GRUB, stub, IMA).
	counts := map[int]int{}
	for _, e := range last {
		if e.Kind == vpcr.KindExtend {
			counts[e.PCR]++
			if e.PCR <= 9 {
				var algs []vpcr.Alg
				for _, d := range e.Digests {
					algs = append(algs, d.Alg)
				}
				if !slices.Equal(algs, banks) {
					t.Errorf("record %d (PCR %d) has digests of %v, want every bank %v", e.Seq, e.PCR, algs, banks)
				}
			}
		}
	}
	var cs []string
	for i := 0; i <= 10; i++ {
		cs = append(cs, fmt.Sprintf("%d:%d", i, counts[i]))
	}
	t.Logf("extend records per PCR: %s", strings.Join(cs, " "))
	// OVMF measures into 0-7 (at least the separators), GRUB into 8 and 9.
	for i := 0; i <= 9; i++ {
		if counts[i] == 0 {
			t.Errorf("no extend record for PCR %d", i)
		}
	}

	// 1. The firmware event log the kernel got from UEFI (OVMF's and
	// GRUB's events, in order) is the sequence of the records of PCRs 0-9:
	// same PCR, same digests in both banks.
	var logged []tcgEvent
	for _, e := range b.evlog {
		if e.Type != evNoAction {
			logged = append(logged, e)
		}
	}
	var recs []vpcr.Event
	for _, e := range last {
		if e.Kind == vpcr.KindExtend && e.PCR <= 9 {
			recs = append(recs, e)
		}
	}
	if len(logged) == 0 {
		t.Fatal("the guest's firmware event log is empty")
	}
	for _, le := range logged {
		t.Logf("event log: PCR %d %s %q", le.PCR, evTypeName(le.Type), describe(le))
	}
	if len(logged) > len(recs) {
		t.Fatalf("firmware event log: %d extends, vTPM records of PCRs 0-9: %d", len(logged), len(recs))
	}
	for i, le := range logged {
		r := recs[i]
		if le.PCR != r.PCR || !digestsEqual(le.Digests, r.Digests) {
			t.Fatalf("event log entry %d (PCR %d, type %#x, %q) differs from record %d (PCR %d)", i, le.PCR, le.Type, printable(le.Data), r.Seq, r.PCR)
		}
	}
	// Records past the log's end are what came after the kernel copied the
	// log: extends of PCRs 0-9 after ExitBootServices (none expected).
	if extra := recs[len(logged):]; len(extra) > 0 {
		for _, r := range extra {
			t.Logf("record %d: PCR %d, not in the guest's event log", r.Seq, r.PCR)
		}
	}

	// 2. GRUB's measurements: the kernel command line (a string event in
	// PCR 8) and the kernel and initrd files (PCR 9) are records.
	var cmdlineSeen bool
	for _, le := range logged {
		s := strings.TrimRight(string(le.Data), "\x00")
		if le.PCR == 8 && strings.HasPrefix(s, "kernel_cmdline: ") && strings.HasSuffix(s, b.cmdline) {
			// GRUB measures the command line without the prefix.
			cmdlineSeen = true
			want := sha256.Sum256([]byte(strings.TrimPrefix(s, "kernel_cmdline: ")))
			if !hasRecord(last, 8, vpcr.SHA256, want[:]) {
				t.Errorf("GRUB's %q: no PCR 8 record with its sha256", s)
			}
		}
	}
	if !cmdlineSeen {
		t.Error("no kernel_cmdline event of GRUB in PCR 8")
	}
	for name, data := range map[string][]byte{"kernel": b.kernel, "initrd": b.initrd} {
		for _, a := range banks {
			h := a.Hash().New()
			h.Write(data)
			if !hasRecord(last, 9, a, h.Sum(nil)) {
				t.Errorf("GRUB loaded the %s, but no PCR 9 record holds its %v digest", name, a)
			}
		}
	}

	// 3. The guest's own PCRs 0-9 equal the replay of the records.
	for _, alg := range banks {
		for i := 0; i <= 9; i++ {
			if got, want := b.guest[alg][i], b.state.Read(alg, i); !bytes.Equal(got, want) {
				t.Errorf("guest PCR %d (%v) %x, replay of the records %x", i, alg, got, want)
			}
		}
	}

	// 4. IMA on the TPM: boot_aggregate over vPCRs 0-9 (now holding the
	// firmware's and GRUB's measurements), PCR 10 the replay of the list.
	if len(b.ima) < 5 || b.ima[0].Fields.Path != "boot_aggregate" {
		t.Fatalf("guest IMA list: %d entries", len(b.ima))
	}
	h := sha256.New()
	for i := 0; i <= 9; i++ {
		h.Write(b.state.Read(vpcr.SHA256, i))
	}
	if ba := b.ima[0].Fields.Digest; !bytes.Equal(ba, h.Sum(nil)) {
		t.Errorf("boot_aggregate %x, want sha256 over vPCRs 0-9 %x", ba, h.Sum(nil))
	}
	pcr := make([]byte, 32)
	for _, e := range b.ima {
		h := sha256.New()
		h.Write(pcr)
		h.Write(e.ExtendDigest(crypto.SHA256))
		pcr = h.Sum(nil)
	}
	if want := b.state.Read(vpcr.SHA256, 10); !bytes.Equal(pcr, want) {
		t.Errorf("replay of %d IMA entries %x, vPCR 10 %x", len(b.ima), pcr, want)
	}

	// What the guest kernel extends into each bank for IMA: its own hash
	// of the template data, or (a bank whose hash its IMA lacks) the
	// SHA-1 zero-padded, which the verifier's pairing accepts there.
	var ext10 []vpcr.Event
	for _, e := range last {
		if e.Kind == vpcr.KindExtend && e.PCR == 10 {
			ext10 = append(ext10, e)
		}
	}
	forms := map[string]int{}
	for i, e := range b.ima {
		if i >= len(ext10) {
			break
		}
		s1 := sha1.Sum(e.TemplateData)
		for _, d := range ext10[i].Digests {
			h := d.Alg.Hash().New()
			h.Write(e.TemplateData)
			switch {
			case bytes.Equal(d.Value, h.Sum(nil)):
				forms[d.Alg.String()+" own hash"]++
			case bytes.Equal(d.Value, append(s1[:], make([]byte, d.Alg.Size()-len(s1))...)):
				forms[d.Alg.String()+" padded sha1"]++
			default:
				forms[d.Alg.String()+" other"]++
			}
		}
	}
	t.Logf("IMA's PCR 10 extends, per bank: %v", forms)

	// 5. Every command OVMF, GRUB and the kernel sent was answered; a
	// PCR_Allocate, if the firmware sent one, succeeded and is journaled.
	b.tr.mu.Lock()
	defer b.tr.mu.Unlock()
	for cc, rcs := range b.tr.rcs {
		for _, rc := range rcs {
			if rc != 0 {
				t.Logf("TPM command %s answered rc %#x", ccName(cc), rc)
			}
		}
	}
	if rcs := b.tr.rcs[0x12B]; len(rcs) > 0 {
		var allocs int
		for _, e := range b.events {
			if e.Kind == vpcr.KindAllocate {
				allocs++
			}
		}
		if slices.ContainsFunc(rcs, func(rc uint32) bool { return rc != 0 }) || allocs != len(rcs) {
			t.Errorf("OVMF's PCR_Allocate: rcs %#x, %d allocate records", rcs, allocs)
		}
	} else {
		t.Logf("OVMF sent no PCR_Allocate (the vTPM's banks %v are all in its hash mask)", banks)
	}
	for _, cc := range []uint32{0x182, 0x17E, 0x17A} {
		if slices.ContainsFunc(b.tr.rcs[cc], func(rc uint32) bool { return rc != 0 }) {
			t.Errorf("%s failed: rcs %#x", ccName(cc), b.tr.rcs[cc])
		}
	}

	// 6. The launch policy pins this measured boot: the loader (the OVMF
	// build) and vPCRs 0-9 in every bank, with the values the guest's own
	// firmware event log replays to. The verifier, from the VM's records
	// alone, trusts it; a boot whose PCR 4 differs (another boot loader)
	// is rejected naming vPCR 4.
	if !pins {
		return
	}
	pinned := logPins(t, logged, banks)
	if err := b.verifyPins(t, pinned); err != nil {
		t.Fatalf("the boot's own vPCRs 0-9 pinned: %v", err)
	}
	other := logPins(t, logged, banks)
	other["sha256"]["4"] = other["sha256"]["5"]
	err := b.verifyPins(t, other)
	if !verify.IsRejection(err) || !strings.Contains(err.Error(), "vpcr:sha256:4") {
		t.Fatalf("PCR 4 pinned to another value: %v, want a rejection naming vpcr:sha256:4", err)
	}
	t.Logf("pinned vPCRs 0-9 of %v and the loader: trusted; PCR 4 pinned otherwise: %v", banks, err)
	if f := os.Getenv("TPMMUX_OVMF_FIXTURE"); f != "" && model == "tpm-crb" {
		writeOVMFFixture(t, f, logged, recs, pinned)
	}
}

// logPins are launch-policy pins (bank -> PCR -> allowed values) of vPCRs
// 0-9 in banks: the replay of the firmware event log's extends.
func logPins(t *testing.T, logged []tcgEvent, banks []vpcr.Alg) map[string]map[string][]string {
	t.Helper()
	st, err := vpcr.New(banks)
	if err != nil {
		t.Fatal(err)
	}
	evs := []vpcr.Event{{Seq: 1, Kind: vpcr.KindInit}, {Seq: 2, Kind: vpcr.KindStartup, Command: 0x144, Banks: banks}}
	for _, e := range logged {
		evs = append(evs, vpcr.Event{Seq: uint64(len(evs) + 1), Kind: vpcr.KindExtend, Command: 0x182, PCR: e.PCR, Digests: e.Digests})
	}
	for _, e := range evs {
		if err := st.Apply(e); err != nil {
			t.Fatal(err)
		}
	}
	pins := map[string]map[string][]string{}
	for _, a := range banks {
		pins[a.String()] = map[string][]string{}
		for i := 0; i <= 9; i++ {
			pins[a.String()][strconv.Itoa(i)] = []string{hex.EncodeToString(st.Read(a, i))}
		}
	}
	return pins
}

// verifyPins sends the guest's IMA list as its agent would (once), takes
// evidence and verifies it under a launch policy of the loader and pins.
func (b *ovmfBoot) verifyPins(t *testing.T, pins map[string]map[string][]string) error {
	t.Helper()
	ctx := context.Background()
	if !b.sent {
		for i, e := range b.ima {
			r := &record.Record{Kind: record.KindMeasurement, Time: 1, Measurement: &record.Measurement{
				PCR: 10, TemplateHashAlg: "sha1", TemplateHash: e.TemplateHash, Template: e.TemplateName,
				TemplateData: e.TemplateData, LogIndex: uint64(i), BootID: "ovmf-boot-1"}}
			if _, err := b.mux.Append(ctx, b.ident.ID(), r); err != nil {
				t.Fatal(err)
			}
		}
		b.sent = true
	}
	raw, err := json.Marshal(map[string]any{"files": map[string][]string{"loader": {hex.EncodeToString(b.loader)}}, "vpcrs": pins})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := policy.ParseLaunch(raw)
	if err != nil {
		t.Fatalf("launch policy %s: %v", raw, err)
	}
	nonce := []byte("a nonce for the OVMF guest, 32 b")
	ev, err := b.mux.Evidence(ctx, b.ident.ID(), nonce)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Verify(ev, verify.Options{Nonce: nonce, Identity: b.ident, AK: b.mux.AK(), PCR: ovmfMuxPCR,
		Appraiser: policy.New(nil, nil).WithLaunch(ext.Launch)})
	if err == nil && (rep.VTPM == nil || rep.VTPM.Paired != len(b.ima) || rep.VTPM.BootAggregates != 1) {
		t.Fatalf("trusted, but the vTPM report is %+v", rep.VTPM)
	}
	return err
}

// ovmfMuxPCR is the host PCR the OVMF test's multiplexer anchors in.
const ovmfMuxPCR = 13

// openOVMFMux opens a multiplexer on the in-process simulator with a
// fresh store in dir.
func openOVMFMux(t *testing.T, dir string) *mux.Mux {
	t.Helper()
	ctx := context.Background()
	tp, err := tpm.Open(ctx, "sim")
	if err != nil {
		t.Fatal(err)
	}
	st, err := logstore.Open(filepath.Join(dir, "log.db"), &logstore.Options{NoSync: true})
	if err != nil {
		tp.Close()
		t.Fatal(err)
	}
	m, err := mux.Open(ctx, tp, st, mux.Config{PCR: ovmfMuxPCR, Logger: quietLog()})
	if err != nil {
		st.Close()
		tp.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); st.Close(); tp.Close() })
	return m
}

// bootOVMF builds the UEFI disk and boots it on a fresh vTPM to power-off.
func bootOVMF(t *testing.T, model string, banks []vpcr.Alg) *ovmfBoot {
	t.Helper()
	return bootOVMFWith(t, ovmfRun{model: model, banks: banks, init: ovmfInit})
}

// ovmfRun is how to boot the OVMF guest.
type ovmfRun struct {
	model string
	banks []vpcr.Alg
	init  string // the initramfs's /init
	// confirm lets the guest reboot and answers OVMF's physical-presence
	// prompts on the serial console with F12 (confirm).
	confirm bool
}

// f12Responder is the serial console of a guest whose firmware asks for
// confirmation: it keeps what the guest prints and presses F12 on the
// guest's PS/2 keyboard (QMP send-key) once for each "Press F12" prompt.
// (OVMF's serial terminal is PC-ANSI, which has no F12 sequence.)
type f12Responder struct {
	mu   sync.Mutex
	out  bytes.Buffer
	qmp  io.Writer // QMP, after capabilities negotiation; responses unread
	sent int
}

func (r *f12Responder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.out.Write(p)
	r.press()
	return len(p), nil
}

// press sends the F12s owed; r.mu held.
func (r *f12Responder) press() {
	for ; r.qmp != nil && r.sent < bytes.Count(r.out.Bytes(), []byte("Press F12")); r.sent++ {
		r.qmp.Write([]byte(`{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"f12"}]}}` + "\n"))
	}
}

func (r *f12Responder) setQMP(w io.Writer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.qmp = w
	r.press()
}

func (r *f12Responder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.out.Bytes())
}

func bootOVMFWith(t *testing.T, run ovmfRun) *ovmfBoot {
	t.Helper()
	model, banks := run.model, run.banks
	tools := guestTools(t)
	qemu, kernel := tools.QEMU, tools.Kernel
	for _, f := range []string{ovmfCode, ovmfVars, "/usr/lib/grub/x86_64-efi/tpm.mod"} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("%s missing (scripts/setup.sh ovmf)", f)
		}
	}
	for _, c := range []string{"mkfs.vfat", "mcopy", "sfdisk", "grub-mkstandalone"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("%s not installed (scripts/setup.sh ovmf)", c)
		}
	}
	dir := t.TempDir()
	initrdData := guestboot.Initramfs(tools.Busybox, run.init)
	initrd := filepath.Join(dir, "initrd.img")
	if err := os.WriteFile(initrd, initrdData, 0o644); err != nil {
		t.Fatal(err)
	}
	kernelData, err := os.ReadFile(kernel)
	if err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk.img")
	build := exec.Command("bash", "../../scripts/e2e/build-uefi-disk.sh", disk,
		"--kernel", kernel, "--initrd", initrd, "--cmdline", guestboot.Cmdline)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build-uefi-disk.sh: %v\n%s", err, out)
	}
	vars := filepath.Join(dir, "OVMF_VARS.fd")
	vd, err := os.ReadFile(ovmfVars)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(vars, vd, 0o644); err != nil {
		t.Fatal(err)
	}

	// The vTPM journals through the multiplexer (mode anchored) on the
	// simulator, as the bridge serves it; the launch records the OVMF
	// build as the domain's loader.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // 11-26 s here under TCG
	defer cancel()
	m := openOVMFMux(t, dir)
	code, err := os.ReadFile(ovmfCode)
	if err != nil {
		t.Fatal(err)
	}
	codeSum := sha256.Sum256(code)
	var ids []uint16
	for _, a := range banks {
		ids = append(ids, uint16(a))
	}
	ident, err := m.NewVM(ctx, mux.Launch{UUID: [16]byte{0x0f, 0x0f}, Name: "ovmf-" + model, VTPMBanks: ids,
		Files: []record.File{{Role: "loader", Path: ovmfCode, SHA256: codeSum[:]}}})
	if err != nil {
		t.Fatal(err)
	}
	tr := &traceLog{}
	v, err := vtpm.New(vtpm.Config{Banks: banks, Journal: m.Journal(ident.ID(), true), Logger: quietLog(), Trace: tr.record}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctrlPath, served := serveVTPM(t, ctx, v, dir)

	console := filepath.Join(dir, "console.log")
	args := []string{"-accel", "tcg", "-machine", "q35", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none",
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + ovmfCode,
		"-drive", "if=pflash,format=raw,unit=1,file=" + vars,
		"-drive", "if=virtio,format=raw,file=" + disk}
	var resp *f12Responder
	qmpPath := filepath.Join(dir, "qmp.sock")
	if run.confirm {
		args = append(args, "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
			"-qmp", "unix:"+qmpPath+",server=on,wait=off")
	} else {
		args = append(args, "-no-reboot", "-chardev", "file,id=con0,path="+console, "-serial", "chardev:con0")
	}
	cmd := exec.CommandContext(ctx, qemu, append(args, guestboot.TPMArgs(ctrlPath, model)...)...)
	var qerr bytes.Buffer
	cmd.Stderr = &qerr
	if run.confirm {
		resp = &f12Responder{}
		cmd.Stdout = resp
	}
	start := time.Now()
	runErr := cmd.Start()
	if runErr == nil {
		if run.confirm {
			q := dialQMP(t, qmpPath)
			defer q.c.Close()
			resp.setQMP(q.c)
		}
		runErr = cmd.Wait()
	}
	took := time.Since(start)
	out, _ := os.ReadFile(console)
	if resp != nil {
		out = resp.bytes()
	}
	if runErr != nil {
		t.Fatalf("qemu after %v: %v\nstderr: %s\nconsole tail: %s", took, runErr, qerr.String(), guestboot.Tail(out, 3000))
	}
	if !bytes.Contains(out, []byte("VTPM-TEST: done")) {
		t.Fatalf("guest did not finish in %v; console tail:\n%s", took, guestboot.Tail(out, 4000))
	}
	cancel()
	<-served
	tr.mu.Lock()
	t.Logf("control commands: %s", summary(tr.control, func(c uint32) string { return fmt.Sprintf("%d", c) }))
	t.Logf("TPM commands: %s", summary(tr.tpm, ccName))
	tr.mu.Unlock()

	events, err := m.TPMEvents(ident.ID())
	if err != nil {
		t.Fatal(err)
	}
	b := &ovmfBoot{events: events, guest: map[vpcr.Alg][10][]byte{}, cmdline: guestboot.Cmdline,
		kernel: kernelData, initrd: initrdData, tr: tr, took: took, mux: m, ident: ident, loader: codeSum[:]}
	if b.state, err = vpcr.Replay(banks, b.events); err != nil {
		t.Fatal(err)
	}
	if !b.state.Equal(v.PCRs()) {
		t.Fatal("the vTPM's vPCRs differ from the replay of its journal")
	}
	var evlog, list strings.Builder
	var policy bool
	var pcrA, pcrB string
	var dmesg []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		i := strings.Index(line, "VTPM-TEST: ")
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+len("VTPM-TEST: "):])
		if len(f) == 0 {
			continue
		}
		switch {
		case f[0] == "pcr" && len(f) == 4:
			alg := map[string]vpcr.Alg{"sha1": vpcr.SHA1, "sha256": vpcr.SHA256, "sha384": vpcr.SHA384, "sha512": vpcr.SHA512}[f[1]]
			n, err := strconv.Atoi(f[2])
			d, err2 := hex.DecodeString(f[3])
			if alg == 0 || err != nil || err2 != nil || n < 0 || n > 9 {
				t.Fatalf("guest line %q", line)
			}
			a := b.guest[alg]
			a[n] = d
			b.guest[alg] = a
		case f[0] == "evlog" && len(f) == 2:
			evlog.WriteString(f[1])
		case f[0] == "b64" && len(f) == 2:
			list.WriteString(f[1])
		case f[0] == "pcr10-sha256" && len(f) == 3:
			pcrA, pcrB = f[1], f[2]
		case f[0] == "policy":
			policy = true
		case f[0] == "dmesg":
			dmesg = append(dmesg, strings.Join(f[1:], " "))
		}
	}
	for _, d := range dmesg {
		t.Logf("guest dmesg: %s", d)
	}
	if !policy {
		t.Fatalf("the guest did not load its IMA policy; console tail:\n%s", guestboot.Tail(out, 3000))
	}
	if bytes.Contains(out, []byte("TPM-bypass")) {
		t.Fatal("IMA ran in TPM-bypass mode: the guest did not find the vTPM")
	}
	raw, err := base64.StdEncoding.DecodeString(evlog.String())
	if err != nil {
		t.Fatalf("guest event log: %v", err)
	}
	if b.evlog, err = parseTCG2Log(raw); err != nil {
		t.Fatalf("guest event log (%d bytes): %v", len(raw), err)
	}
	rawList, err := base64.StdEncoding.DecodeString(list.String())
	if err != nil {
		t.Fatalf("guest IMA list: %v", err)
	}
	if b.ima, err = ima.ParseList(rawList); err != nil {
		t.Fatalf("parse guest IMA list: %v", err)
	}
	if pcrA == "" || pcrA != pcrB {
		t.Fatalf("guest PCR 10 %q then %q", pcrA, pcrB)
	}
	if g, _ := hex.DecodeString(pcrA); !bytes.Equal(g, b.state.Read(vpcr.SHA256, 10)) {
		t.Fatalf("guest PCR 10 %s, replay of the records %x", pcrA, b.state.Read(vpcr.SHA256, 10))
	}
	return b
}

// hasRecord reports whether events hold an extend of pcr with digest d in
// bank alg.
func hasRecord(events []vpcr.Event, pcr int, alg vpcr.Alg, d []byte) bool {
	return slices.ContainsFunc(events, func(e vpcr.Event) bool {
		return e.Kind == vpcr.KindExtend && e.PCR == pcr && slices.ContainsFunc(e.Digests, func(x vpcr.Digest) bool {
			return x.Alg == alg && bytes.Equal(x.Value, d)
		})
	})
}

// digestsEqual compares an event log entry's digests with a record's.
func digestsEqual(a, b []vpcr.Digest) bool {
	return slices.EqualFunc(a, b, func(x, y vpcr.Digest) bool { return x.Alg == y.Alg && bytes.Equal(x.Value, y.Value) })
}

func printable(b []byte) string {
	if len(b) > 60 {
		b = b[:60]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '.'
		}
		return r
	}, string(b))
}

// evNoAction is EV_NO_ACTION: a log entry that extends nothing.
const evNoAction = 3

// evTypes are the TCG PC Client event types an OVMF + GRUB boot logs.
var evTypes = map[uint32]string{
	0x3: "EV_NO_ACTION", 0x4: "EV_SEPARATOR", 0x5: "EV_ACTION", 0x8: "EV_S_CRTM_VERSION", 0xd: "EV_IPL",
	0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG", 0x80000002: "EV_EFI_VARIABLE_BOOT",
	0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION", 0x80000006: "EV_EFI_GPT_EVENT",
	0x80000007: "EV_EFI_ACTION", 0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
	0x80000009: "EV_EFI_HANDOFF_TABLES", 0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
	0x8000000B: "EV_EFI_HANDOFF_TABLES2", 0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
}

func evTypeName(t uint32) string {
	if n, ok := evTypes[t]; ok {
		return n
	}
	return fmt.Sprintf("%#x", t)
}

// describe is a short text of an event's data: the variable name of an
// EFI variable event (UEFI_VARIABLE_DATA), the string of GRUB's and
// OVMF's text events, else nothing (a blob or a digest).
func describe(e tcgEvent) string {
	switch e.Type {
	case 0x80000001, 0x80000002, 0x800000E0:
		r := &leReader{b: e.Data}
		r.bytes(16) // VariableName GUID
		n := r.bytes(8)
		r.bytes(8)
		if r.err != nil || binary.LittleEndian.Uint64(n) > 64 {
			return ""
		}
		name := r.bytes(int(binary.LittleEndian.Uint64(n)) * 2)
		var out []rune
		for i := 0; i+1 < len(name); i += 2 {
			out = append(out, rune(binary.LittleEndian.Uint16(name[i:])))
		}
		return "variable " + string(out)
	case 0xd, 0x80000007, 0x5:
		return strings.TrimRight(string(e.Data), "\x00")
	}
	return ""
}

// tcgEvent is one entry of a crypto-agile (TCG2) firmware event log.
type tcgEvent struct {
	PCR     int
	Type    uint32
	Digests []vpcr.Digest
	Data    []byte
}

// parseTCG2Log parses a TCG PC Client crypto-agile event log (what the
// guest's /sys/kernel/security/tpm0/binary_bios_measurements holds on
// UEFI): a TCG_PCR_EVENT header (the Spec ID event, naming the digest
// sizes), then TCG_PCR_EVENT2 entries, little-endian. The header is left
// out of the result.
func parseTCG2Log(b []byte) ([]tcgEvent, error) {
	r := &leReader{b: b}
	// TCG_PCR_EVENT: pcrIndex, eventType, sha1 digest, eventSize, event.
	r.u32()
	r.u32()
	r.bytes(20)
	spec := r.bytes(int(r.u32()))
	if r.err != nil || !bytes.HasPrefix(spec, []byte("Spec ID Event03\x00")) {
		return nil, errors.New("no Spec ID Event03 header: not a crypto-agile log")
	}
	sr := &leReader{b: spec[16:]}
	sr.u32() // platformClass
	sr.bytes(4)
	sizes := map[vpcr.Alg]int{}
	for n := sr.u32(); n > 0 && sr.err == nil; n-- {
		alg := vpcr.Alg(sr.u16())
		sizes[alg] = int(sr.u16())
	}
	if sr.err != nil {
		return nil, fmt.Errorf("spec ID event: %w", sr.err)
	}
	var out []tcgEvent
	for len(r.b) > 0 && r.err == nil {
		var e tcgEvent
		e.PCR = int(r.u32())
		e.Type = r.u32()
		for n := r.u32(); n > 0 && r.err == nil; n-- {
			alg := vpcr.Alg(r.u16())
			size, ok := sizes[alg]
			if !ok {
				return nil, fmt.Errorf("event %d: digest of unknown algorithm %#x", len(out), alg)
			}
			e.Digests = append(e.Digests, vpcr.Digest{Alg: alg, Value: r.bytes(size)})
		}
		e.Data = r.bytes(int(r.u32()))
		if r.err == nil {
			out = append(out, e)
		}
	}
	if r.err != nil {
		return nil, fmt.Errorf("event %d: %w", len(out), r.err)
	}
	return out, nil
}

type leReader struct {
	b   []byte
	err error
}

func (r *leReader) bytes(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = errors.New("truncated")
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *leReader) u32() uint32 {
	if v := r.bytes(4); v != nil {
		return binary.LittleEndian.Uint32(v)
	}
	return 0
}

func (r *leReader) u16() uint16 {
	if v := r.bytes(2); v != nil {
		return binary.LittleEndian.Uint16(v)
	}
	return 0
}

// ovmfFixture is internal/verify/testdata/ovmf-boot.json: a real OVMF ->
// GRUB boot's extends of vPCRs 0-9 and the pins they give, for the
// verifier's fast tests. TPMMUX_OVMF_FIXTURE=PATH writes it.
type ovmfFixture struct {
	About   string                         `json:"about"`
	Banks   []string                       `json:"banks"`
	Extends []fixtureExtend                `json:"extends"`
	VPCRs   map[string]map[string][]string `json:"vpcrs"`
}

type fixtureExtend struct {
	PCR     int               `json:"pcr"`
	Type    string            `json:"type"`
	Event   string            `json:"event"`
	Digests map[string]string `json:"digests"`
}

func writeOVMFFixture(t *testing.T, path string, logged []tcgEvent, recs []vpcr.Event, pins map[string]map[string][]string) {
	t.Helper()
	f := ovmfFixture{About: "The vTPM records of PCRs 0-9 of a real boot (Debian's OVMF 2022.11 OVMF_CODE_4M.fd, q35, " +
		"tpm-crb, GRUB 2.06 built by scripts/e2e/build-uefi-disk.sh, the e2e 6.1 kernel), from " +
		"TestQEMUOVMFMeasuredBoot with TPMMUX_OVMF_FIXTURE set, and the launch-policy pins of vPCRs 0-9 they replay to.",
		VPCRs: pins}
	for _, a := range vtpm.DefaultBanks() {
		f.Banks = append(f.Banks, a.String())
	}
	for i, r := range recs {
		x := fixtureExtend{PCR: r.PCR, Digests: map[string]string{}}
		if i < len(logged) {
			x.Type, x.Event = evTypeName(logged[i].Type), describe(logged[i])
		}
		for _, d := range r.Digests {
			x.Digests[d.Alg.String()] = hex.EncodeToString(d.Value)
		}
		f.Extends = append(f.Extends, x)
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s", path)
}

// ovmfAllocateInit is ovmfInit with a first step: while the vTPM still has
// its sha1 bank, guest root asks the firmware (TPM physical-presence
// interface, operation 23 SetPCRBanks) for sha256 only and reboots.
var ovmfAllocateInit = strings.Replace(ovmfInit, `echo "VTPM-TEST: start"
`, `echo "VTPM-TEST: start"
if [ -d /sys/class/tpm/tpm0/pcr-sha1 ]; then
  echo "VTPM-TEST: ppi-version $(cat /sys/class/tpm/tpm0/ppi/version)"
  echo "23 2" >/sys/class/tpm/tpm0/ppi/request
  echo "VTPM-TEST: ppi-request $(cat /sys/class/tpm/tpm0/ppi/request)"
  reboot -f
fi
`, 1)

// TestQEMUOVMFPCRAllocate: OVMF allocates PCR banks on the vTPM. Guest
// root requests sha256 only through the physical-presence interface and
// reboots; OVMF asks on the console (the test presses F12), sends
// PCR_Allocate with platform auth and resets; the next boot runs on the
// sha256 bank alone, and every record and the guest's PCRs agree.
func TestQEMUOVMFPCRAllocate(t *testing.T) {
	b := bootOVMFWith(t, ovmfRun{model: "tpm-crb", banks: vtpm.DefaultBanks(), init: ovmfAllocateInit, confirm: true})
	t.Logf("three boots (request, allocate, sha256 only) to power-off in %v", b.took.Round(10*time.Millisecond))
	// The journal: a boot on sha1+sha256 (the request), one on which OVMF
	// allocates (and resets), and one on sha256 alone.
	var kinds []string
	var allocs []vpcr.Event
	for _, e := range b.events {
		switch e.Kind {
		case vpcr.KindExtend:
			continue
		case vpcr.KindAllocate:
			allocs = append(allocs, e)
		}
		kinds = append(kinds, fmt.Sprintf("%d:%v%v", e.Seq, e.Kind, e.Banks))
	}
	t.Logf("records other than extends: %s", strings.Join(kinds, " "))
	var startups [][]vpcr.Alg
	for _, e := range b.events {
		if e.Kind == vpcr.KindStartup {
			startups = append(startups, e.Banks)
		}
	}
	sha256Only := []vpcr.Alg{vpcr.SHA256}
	if len(startups) != 3 || !slices.Equal(startups[0], vtpm.DefaultBanks()) || !slices.Equal(startups[1], vtpm.DefaultBanks()) || !slices.Equal(startups[2], sha256Only) {
		t.Fatalf("boots with banks %v, want [sha1 sha256] twice, then [sha256]", startups)
	}
	if len(allocs) != 1 || !slices.Equal(allocs[0].Banks, sha256Only) || allocs[0].Locality != 0 {
		t.Fatalf("allocate records %+v, want one of [sha256] at locality 0", allocs)
	}
	b.tr.mu.Lock()
	rcs := slices.Clone(b.tr.rcs[0x12B])
	b.tr.mu.Unlock()
	if !slices.Equal(rcs, []uint32{0}) {
		t.Fatalf("PCR_Allocate answered %#x, want one success", rcs)
	}
	// The last boot: sha256 alone in every record, the guest's PCRs and
	// its firmware event log; no sha1 bank in the guest.
	for _, e := range lastBoot(b.events) {
		if e.Kind == vpcr.KindExtend && (len(e.Digests) != 1 || e.Digests[0].Alg != vpcr.SHA256) {
			t.Fatalf("record %d of the sha256-only boot has digests %v", e.Seq, e.Digests)
		}
	}
	if _, ok := b.guest[vpcr.SHA1]; ok || b.state.IsActive(vpcr.SHA1) {
		t.Fatal("the guest still has a sha1 bank")
	}
	checkOVMFBoot(t, b, "tpm-crb", sha256Only, false)
}
