package vtpm_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/logstore"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// The QEMU test boots the e2e guest kernel (Debian's 6.1 bzImage from the
// scripts/e2e kernel cache) under QEMU TCG with its TPM emulator backend
// pointed at the vTPM's control socket, and a tiny busybox initramfs built
// here whose /init loads an IMA policy, runs programs and prints the
// guest's PCR 10 and its binary IMA list on the console.
//
// Needs: qemu-system-x86_64 (7.2), busybox-static (/bin/busybox), and a
// populated kernel cache (scripts/e2e/build-guest.sh fills it; the same
// lookup as scripts/e2e/lib.sh: $TPMMUX_E2E_CACHE, else
// $XDG_CACHE_HOME/tpmmux-e2e, else /var/cache/tpmmux-e2e for root). Skipped
// otherwise, and with -short.

const guestCmdline = "console=ttyS0 ima_policy=tcb ima_template=ima-ng ima_hash=sha256 panic=-1 quiet"

// guestInit is the initramfs's /init. Every line it prints for the host
// starts with "VTPM-TEST: ".
const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t securityfs securityfs /sys/kernel/security
mount -t ramfs ramfs /run
echo "VTPM-TEST: start"
if cat /etc/ima-policy >/sys/kernel/security/ima/policy; then echo "VTPM-TEST: policy loaded"; fi
for t in /opt/vtpm/tool-*; do "$t"; done
cat /opt/vtpm/data >/dev/null
ls /sys/class/tpm/ | sed 's/^/VTPM-TEST: tpm-dev /'
dmesg | grep -i -E 'tpm|ima' | sed 's/^/VTPM-TEST: dmesg /'
# Guest root sends raw TPM commands through /dev/tpm0 (printf + dd).
tpmcmd() { # tpmcmd NAME HEX-ESCAPED-COMMAND
  [ -c /dev/tpm0 ] || return 0
  exec 3<>/dev/tpm0
  printf "$2" >&3
  echo "VTPM-TEST: tpmcmd $1 $(dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n')"
  exec 3>&-
}
p0=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
tpmcmd startup '\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x44\x00\x00'
tpmcmd reset10 '\x80\x02\x00\x00\x00\x1b\x00\x00\x01\x3d\x00\x00\x00\x0a\x00\x00\x00\x09\x40\x00\x00\x09\x00\x00\x01\x00\x00'
tpmcmd reset0 '\x80\x02\x00\x00\x00\x1b\x00\x00\x01\x3d\x00\x00\x00\x00\x00\x00\x00\x09\x40\x00\x00\x09\x00\x00\x01\x00\x00'
tpmcmd reset17 '\x80\x02\x00\x00\x00\x1b\x00\x00\x01\x3d\x00\x00\x00\x11\x00\x00\x00\x09\x40\x00\x00\x09\x00\x00\x01\x00\x00'
tpmcmd reset16 '\x80\x02\x00\x00\x00\x1b\x00\x00\x01\x3d\x00\x00\x00\x10\x00\x00\x00\x09\x40\x00\x00\x09\x00\x00\x01\x00\x00'
tpmcmd createprimary '\x80\x01\x00\x00\x00\x0a\x00\x00\x01\x31'
echo "VTPM-TEST: pcr10-before-user-cmds $p0"
a=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
cp /sys/kernel/security/ima/binary_runtime_measurements /run/ima.bin
b=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
echo "VTPM-TEST: pcr10-sha256 $a $b"
echo "VTPM-TEST: pcr10-sha1 $(cat /sys/class/tpm/tpm0/pcr-sha1/10)"
echo "VTPM-TEST: ima-begin"
base64 /run/ima.bin | sed 's/^/VTPM-TEST: b64 /'
echo "VTPM-TEST: ima-end"
echo "VTPM-TEST: done"
poweroff -f
`

// The IMA policy of scripts/e2e/build-guest.sh: measure programs run and
// files root reads, except on pseudo file systems and the ramfs scratch.
const guestPolicy = `dont_measure fsmagic=0x9fa0
dont_measure fsmagic=0x62656572
dont_measure fsmagic=0x64626720
dont_measure fsmagic=0x73636673
dont_measure fsmagic=0x1cd1
dont_measure fsmagic=0x858458f6
dont_measure fsmagic=0x27e0eb
dont_measure fsmagic=0x63677270
measure func=BPRM_CHECK
measure func=FILE_CHECK mask=MAY_READ uid=0
`

// kernelCacheDir is scripts/e2e/lib.sh's e2e_cache_dir.
func kernelCacheDir() string {
	if d := os.Getenv("TPMMUX_E2E_CACHE"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "tpmmux-e2e")
	}
	if os.Getuid() == 0 {
		return "/var/cache/tpmmux-e2e"
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "tpmmux-e2e")
}

// guestKernel returns the newest complete cached bzImage.
func guestKernel() (string, error) {
	marks, _ := filepath.Glob(filepath.Join(kernelCacheDir(), "kernel", "*", ".complete"))
	sort.Strings(marks)
	for i := len(marks) - 1; i >= 0; i-- {
		k := filepath.Join(filepath.Dir(marks[i]), "vmlinuz")
		if _, err := os.Stat(k); err == nil {
			return k, nil
		}
	}
	return "", fmt.Errorf("no cached guest kernel under %s/kernel (run scripts/e2e/build-guest.sh once to fill it)", kernelCacheDir())
}

// cpioWriter writes a newc cpio archive (the initramfs format).
type cpioWriter struct {
	b   bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode uint32, rdevMajor, rdevMinor int, data []byte) {
	w.ino++
	fmt.Fprintf(&w.b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 1700000000, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.b.WriteString(name)
	w.b.WriteByte(0)
	w.pad()
	w.b.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.b.Len()%4 != 0 {
		w.b.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string)                      { w.entry(name, 0o40755, 0, 0, nil) }
func (w *cpioWriter) file(name string, m uint32, d []byte) { w.entry(name, 0o100000|m, 0, 0, d) }
func (w *cpioWriter) close() []byte {
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	return w.b.Bytes()
}

// buildInitramfs returns the test guest's initramfs.
func buildInitramfs(busybox []byte) []byte { return buildInitramfsWith(busybox, guestInit) }

// buildInitramfsWith is buildInitramfs with another /init.
func buildInitramfsWith(busybox []byte, init string) []byte {
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "run", "tmp", "opt", "opt/vtpm"} {
		w.dir(d)
	}
	w.entry("dev/console", 0o20600, 5, 1, nil)
	w.file("bin/busybox", 0o755, busybox)
	w.file("init", 0o755, []byte(init))
	w.file("etc/ima-policy", 0o644, []byte(guestPolicy))
	w.file("opt/vtpm/data", 0o644, []byte("data the guest reads\n"))
	for i := 1; i <= 3; i++ {
		w.file(fmt.Sprintf("opt/vtpm/tool-%d", i), 0o755, []byte(fmt.Sprintf("#!/bin/sh\necho tool-%d ran\n", i)))
	}
	return w.close()
}

// traceLog collects the control and TPM commands the vTPM saw.
type traceLog struct {
	mu      sync.Mutex
	control []uint32
	tpm     []uint32
	rcs     map[uint32][]uint32 // TPM command code -> response codes
}

func (l *traceLog) record(control bool, code, rc uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if control {
		l.control = append(l.control, code)
		return
	}
	l.tpm = append(l.tpm, code)
	if l.rcs == nil {
		l.rcs = map[uint32][]uint32{}
	}
	l.rcs[code] = append(l.rcs[code], rc)
}

var ccNames = map[uint32]string{
	0x121: "HierarchyControl", 0x129: "HierarchyChangeAuth", 0x12B: "PCR_Allocate", 0x13C: "PCR_Event",
	0x13D: "PCR_Reset", 0x142: "IncrementalSelfTest", 0x143: "SelfTest", 0x144: "Startup", 0x145: "Shutdown",
	0x146: "StirRandom", 0x17A: "GetCapability", 0x17B: "GetRandom", 0x17C: "GetTestResult", 0x17E: "PCR_Read",
	0x181: "ReadClock", 0x182: "PCR_Extend",
}

// summary is the commands in order with runs collapsed ("5× PCR_Extend").
func summary(codes []uint32, name func(uint32) string) string {
	var parts []string
	for i := 0; i < len(codes); {
		j := i
		for j < len(codes) && codes[j] == codes[i] {
			j++
		}
		s := name(codes[i])
		if j-i > 1 {
			s = fmt.Sprintf("%d× %s", j-i, s)
		}
		parts = append(parts, s)
		i = j
	}
	return strings.Join(parts, ", ")
}

func ccName(c uint32) string {
	if n, ok := ccNames[c]; ok {
		return n
	}
	return fmt.Sprintf("0x%x", c)
}

// TestQEMUGuestIMA boots a real guest on the vTPM and checks that IMA uses
// it: no TPM-bypass, a non-zero boot_aggregate equal to the digest of the
// vPCRs 0-9, and the guest's own PCR 10 equal to the vTPM's vPCR 10, to the
// replay of the journal and to the replay of the guest's IMA list.
func TestQEMUGuestIMA(t *testing.T) {
	for _, model := range []string{"tpm-crb", "tpm-tis"} {
		t.Run(model, func(t *testing.T) { testQEMUGuestIMA(t, model) })
	}
}

func testQEMUGuestIMA(t *testing.T, model string) {
	qemu, kernel, initrd := guestSetup(t)
	dir := t.TempDir()
	var tr traceLog
	j := &vtpmtest.Journal{}
	v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog(), Trace: tr.record}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ctrlPath, served := serveVTPM(t, ctx, v, dir)
	out, took := runGuest(t, ctx, qemu, kernel, initrd, dir, tpmArgsModel(ctrlPath, model)...)
	t.Logf("guest ran to power-off in %v", took.Round(10*time.Millisecond))

	// Parse the guest's report.
	var pcrA, pcrB, pcr1 string
	var b64 strings.Builder
	var doneSeen, policy bool
	userCmds := map[string]string{}
	var pcrBefore string
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
		switch f[0] {
		case "pcr10-sha256":
			if len(f) == 3 {
				pcrA, pcrB = f[1], f[2]
			}
		case "pcr10-sha1":
			if len(f) == 2 {
				pcr1 = f[1]
			}
		case "b64":
			if len(f) == 2 {
				b64.WriteString(f[1])
			}
		case "tpmcmd":
			if len(f) == 3 {
				userCmds[f[1]] = f[2]
			}
		case "pcr10-before-user-cmds":
			if len(f) == 2 {
				pcrBefore = f[1]
			}
		case "dmesg":
			dmesg = append(dmesg, strings.Join(f[1:], " "))
		case "policy":
			policy = true
		case "done":
			doneSeen = true
		}
	}
	if !doneSeen || !policy {
		t.Fatalf("guest did not finish (done %v, policy %v); console tail:\n%s", doneSeen, policy, tail(out, 4000))
	}
	for _, d := range dmesg {
		t.Logf("guest dmesg: %s", d)
	}
	if bytes.Contains(out, []byte("TPM-bypass")) || slices.ContainsFunc(dmesg, func(s string) bool { return strings.Contains(s, "TPM-bypass") }) {
		t.Fatal("IMA ran in TPM-bypass mode: the guest did not find the vTPM")
	}
	if pcrA == "" || pcrA != pcrB {
		t.Fatalf("guest PCR 10 %q then %q (changed while the list was copied, or unreadable)", pcrA, pcrB)
	}
	// The TPM's state rules hold against guest root (/dev/tpm0): a
	// Startup(CLEAR) is refused and resets nothing, PCR_Reset works only on
	// 16 (and 23) at locality 0, never on 0-15 or the D-RTM PCRs, and
	// unimplemented commands get TPM_RC_COMMAND_CODE.
	for name, want := range map[string]string{
		"startup":       "80010000000a00000100", // TPM_RC_INITIALIZE
		"reset10":       "80010000000a00000907", // TPM_RC_LOCALITY
		"reset0":        "80010000000a00000907",
		"reset17":       "80010000000a00000907",
		"reset16":       "80020000001300000000000000000000010000", // success, password session echo
		"createprimary": "80010000000a00000143",                   // TPM_RC_COMMAND_CODE
	} {
		if got := userCmds[name]; got != want {
			t.Errorf("guest root's %s through /dev/tpm0: response %q, want %q", name, got, want)
		}
	}
	if pcrBefore != pcrA {
		t.Errorf("guest PCR 10 %s before its user-space Startup/PCR_Reset, %s after", pcrBefore, pcrA)
	}
	list, err := base64.StdEncoding.DecodeString(b64.String())
	if err != nil {
		t.Fatalf("guest IMA list: %v", err)
	}
	entries, err := ima.ParseList(list)
	if err != nil {
		t.Fatalf("parse guest IMA list: %v", err)
	}
	if len(entries) < 5 || entries[0].Fields.Path != "boot_aggregate" {
		t.Fatalf("guest IMA list: %d entries, first %q", len(entries), entries[0].Fields.Path)
	}

	// 1. The vTPM's vPCR 10 (live) equals the guest's own view.
	guest10, _ := hex.DecodeString(pcrA)
	st := v.PCRs()
	if got := st.Read(vpcr.SHA256, 10); !bytes.Equal(got, guest10) {
		t.Fatalf("vPCR 10 %x, guest's pcr-sha256/10 %x", got, guest10)
	}
	if got := st.Read(vpcr.SHA1, 10); !strings.EqualFold(hex.EncodeToString(got), pcr1) {
		t.Fatalf("vPCR 10 sha1 %x, guest's pcr-sha1/10 %s", got, pcr1)
	}
	// 2. The replay of the journal equals both.
	replayed, err := vpcr.Replay(vtpm.DefaultBanks(), j.Events())
	if err != nil {
		t.Fatal(err)
	}
	if !replayed.Equal(st) {
		t.Fatal("vPCRs differ from the replay of the journal")
	}
	// 3. The replay of the guest's IMA list equals them (sha256 bank).
	pcr := make([]byte, 32)
	for _, e := range entries {
		h := sha256.New()
		h.Write(pcr)
		h.Write(e.ExtendDigest(crypto.SHA256))
		pcr = h.Sum(nil)
	}
	if !bytes.Equal(pcr, guest10) {
		t.Fatalf("replay of %d IMA entries %x, guest PCR 10 %x", len(entries), pcr, guest10)
	}
	// 4. boot_aggregate is non-zero and is sha256 over vPCRs 0-9 (sha256
	// bank), as IMA computes it for a TPM 2.0.
	ba := entries[0].Fields.Digest
	if bytes.Equal(ba, make([]byte, len(ba))) {
		t.Fatal("boot_aggregate is zero")
	}
	h := sha256.New()
	for i := 0; i <= 9; i++ {
		h.Write(replayed.Read(vpcr.SHA256, i))
	}
	if want := h.Sum(nil); entries[0].Fields.DigestAlg != "sha256" || !bytes.Equal(ba, want) {
		t.Fatalf("boot_aggregate %s:%x, want sha256:%x from vPCRs 0-9", entries[0].Fields.DigestAlg, ba, want)
	}
	// Every IMA measurement is one journaled PCR 10 extend at locality 0.
	var imaExtends int
	for _, e := range j.Events() {
		if e.Kind == vpcr.KindExtend && e.PCR == 10 {
			imaExtends++
			if e.Locality != 0 {
				t.Fatalf("IMA extend at locality %d", e.Locality)
			}
		}
	}
	if imaExtends != len(entries) {
		t.Fatalf("%d PCR 10 extends journaled, %d IMA entries", imaExtends, len(entries))
	}

	cancel()
	<-served
	tr.mu.Lock()
	defer tr.mu.Unlock()
	t.Logf("IMA: %d entries, boot_aggregate sha256:%x, PCR 10 %x", len(entries), ba, guest10)
	t.Logf("control commands: %s", summary(tr.control, func(c uint32) string { return fmt.Sprintf("%d", c) }))
	t.Logf("TPM commands: %s", summary(tr.tpm, ccName))
	for cc, rcs := range tr.rcs {
		for _, rc := range rcs {
			if rc != 0 {
				t.Logf("TPM command %s answered rc %#x", ccName(cc), rc)
			}
		}
	}
	// The control commands QEMU 7.2 sends, as recorded with swtpm
	// (vtpm-observed.md), up to the INIT.
	wantCtrl := []uint32{16, 1, 14, 17, 14, 17, 2}
	if len(tr.control) < len(wantCtrl) || !slices.Equal(tr.control[:len(wantCtrl)], wantCtrl) {
		t.Errorf("control commands %v, want them to start %v", tr.control, wantCtrl)
	}
}

// guestSetup finds QEMU, the cached kernel and busybox, and writes the
// test initramfs; it skips the test when one is missing.
func guestSetup(t testing.TB) (qemu, kernel, initrd string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a QEMU guest (about 10-30 s under TCG)")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed (Debian: qemu-system-x86)")
	}
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("no /bin/busybox (Debian: busybox-static)")
	}
	kernel, err = guestKernel()
	if err != nil {
		t.Skip(err)
	}
	initrd = filepath.Join(t.TempDir(), "initrd.img")
	if err := os.WriteFile(initrd, buildInitramfs(busybox), 0o644); err != nil {
		t.Fatal(err)
	}
	return qemu, kernel, initrd
}

// serveVTPM serves v on a new control socket in dir.
func serveVTPM(t testing.TB, ctx context.Context, v *vtpm.VTPM, dir string) (string, chan error) {
	t.Helper()
	ctrlPath := filepath.Join(dir, "ctrl.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	served := make(chan error, 1)
	go func() { served <- v.ServeListener(ctx, l) }()
	return ctrlPath, served
}

// tpmArgs are QEMU's arguments for a TPM emulator backend on ctrlPath.
func tpmArgs(ctrlPath string) []string { return tpmArgsModel(ctrlPath, "tpm-crb") }

// tpmArgsModel is tpmArgs with another TPM device model (tpm-tis).
func tpmArgsModel(ctrlPath, model string) []string {
	return []string{"-chardev", "socket,id=chrtpm,path=" + ctrlPath,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", model + ",tpmdev=tpm0"}
}

// runGuest boots the test guest until it powers off and returns its
// console and the time it took.
func runGuest(t testing.TB, ctx context.Context, qemu, kernel, initrd, dir string, extra ...string) ([]byte, time.Duration) {
	t.Helper()
	console := filepath.Join(dir, "console.log")
	os.Remove(console)
	args := []string{"-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", guestCmdline,
		"-chardev", "file,id=con0,path=" + console, "-serial", "chardev:con0"}
	cmd := exec.CommandContext(ctx, qemu, append(args, extra...)...)
	var qerr bytes.Buffer
	cmd.Stderr = &qerr
	start := time.Now()
	if err := cmd.Run(); err != nil {
		out, _ := os.ReadFile(console)
		t.Fatalf("qemu: %v\nstderr: %s\nconsole tail: %s", err, qerr.String(), tail(out, 3000))
	}
	took := time.Since(start)
	out, err := os.ReadFile(console)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(out, []byte("VTPM-TEST: done")) {
		t.Fatalf("guest did not finish; console tail:\n%s", tail(out, 3000))
	}
	return out, took
}

// BenchmarkGuestBoot is the test guest's boot to power-off (IMA policy
// loaded, programs measured, list and PCR 10 printed) on the vTPM, on
// swtpm as a per-VM vTPM, and with no TPM: same kernel, same initramfs.
// Each iteration boots all three in turn, so a change in the machine's
// load hits all three alike; it reports each one's mean.
//
//	go test -run '^$' -bench GuestBoot -benchtime 3x ./internal/vtpm/
func BenchmarkGuestBoot(b *testing.B) {
	qemu, kernel, initrd := guestSetup(b)
	if _, err := exec.LookPath("swtpm"); err != nil {
		b.Skip("swtpm not installed (Debian: swtpm)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	bridge := &bridgeMux{}
	variants := []struct {
		name  string
		setup func(dir string) []string
	}{
		{"vtpm", func(dir string) []string {
			v, err := vtpm.New(vtpm.Config{Journal: &vtpmtest.Journal{}, Logger: quietLog()}, nil)
			if err != nil {
				b.Fatal(err)
			}
			sctx, stop := context.WithCancel(ctx)
			b.Cleanup(stop)
			p, _ := serveVTPM(b, sctx, v, dir)
			return tpmArgs(p)
		}},
		{"bridge", func(dir string) []string {
			// The vTPM as the bridge serves it: every event through the
			// multiplexer's journal on an fsynced store (mode durable).
			j := bridge.journal(b, dir)
			v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog()}, nil)
			if err != nil {
				b.Fatal(err)
			}
			sctx, stop := context.WithCancel(ctx)
			b.Cleanup(stop)
			p, _ := serveVTPM(b, sctx, v, dir)
			return tpmArgs(p)
		}},
		{"swtpm", func(dir string) []string {
			p := filepath.Join(dir, "swtpm.sock")
			cmd := exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
				"--ctrl", "type=unixio,path="+p, "--flags", "startup-clear")
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			for range 100 {
				if _, err := os.Stat(p); err == nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			return tpmArgs(p)
		}},
		{"none", func(string) []string { return nil }},
	}
	total := make([]time.Duration, len(variants))
	for range b.N {
		for i, v := range variants {
			dir := b.TempDir()
			_, took := runGuest(b, ctx, qemu, kernel, initrd, dir, v.setup(dir)...)
			total[i] += took
		}
	}
	for i, v := range variants {
		b.ReportMetric(total[i].Seconds()/float64(b.N), v.name+"-s/boot")
	}
	b.ReportMetric(float64(total[0])/float64(total[2]), "vtpm/swtpm")
	b.ReportMetric(float64(total[1])/float64(total[2]), "bridge/swtpm")
}

// bridgeMux is a multiplexer on the simulator (a process singleton: one
// for the whole benchmark) with an fsynced store, serving a new VM's vTPM
// journal (mode durable) for each boot.
type bridgeMux struct {
	m *mux.Mux
	n int
}

func (bm *bridgeMux) journal(b *testing.B, dir string) *mux.Journal {
	ctx := context.Background()
	if bm.m == nil {
		tp, err := tpm.Open(ctx, "sim")
		if err != nil {
			b.Fatal(err)
		}
		st, err := logstore.Open(filepath.Join(dir, "log.db"), nil)
		if err != nil {
			b.Fatal(err)
		}
		if bm.m, err = mux.Open(ctx, tp, st, mux.Config{Logger: quietLog()}); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { bm.m.Close(); st.Close(); tp.Close() })
	}
	bm.n++
	id, err := bm.m.NewVM(ctx, mux.Launch{UUID: [16]byte{0xb0, byte(bm.n)}, Name: fmt.Sprintf("boot-%d", bm.n), VTPMBanks: []uint16{uint16(vpcr.SHA1), uint16(vpcr.SHA256)}})
	if err != nil {
		b.Fatal(err)
	}
	return bm.m.Journal(id.ID(), false)
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
