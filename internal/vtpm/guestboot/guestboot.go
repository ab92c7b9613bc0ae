// Package guestboot boots a small Linux guest under QEMU with IMA
// measuring into a TPM, for internal/vtpm's tests and tpmmux-bench's boot
// time (P9): the e2e guest kernel (Debian's 6.1 bzImage from the
// scripts/e2e kernel cache) under QEMU TCG, and a busybox initramfs built
// here whose /init loads an IMA policy, runs programs and prints the
// guest's PCR 10 and its binary IMA list on the console, then powers off.
//
// It needs qemu-system-x86_64 (Debian: qemu-system-x86), a static busybox
// at /bin/busybox (Debian: busybox-static) and a populated kernel cache
// (scripts/e2e/build-guest.sh fills it); Find says which one is missing
// and how to get it.
package guestboot

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"time"
)

// Cmdline is the guest kernel's command line: console on the first serial
// port, IMA with the tcb policy until /init loads its own, ima-ng sha256.
const Cmdline = "console=ttyS0 ima_policy=tcb ima_template=ima-ng ima_hash=sha256 panic=-1 quiet"

// Marker starts every line the guest's /init prints for the host.
const Marker = "VTPM-TEST: "

// DoneMarker is the line /init prints last, before it powers off: a
// console without it is a guest that did not finish.
const DoneMarker = Marker + "done"

// Prelude is how every test guest's /init begins: busybox's applets, the
// kernel's file systems (securityfs for IMA), the console as stdio.
const Prelude = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t securityfs securityfs /sys/kernel/security
mount -t ramfs ramfs /run
`

// Init is the initramfs's /init: it loads Policy, runs the /opt/vtpm
// tools and reads a file (so IMA measures them), sends raw TPM commands as
// guest root through /dev/tpm0, and prints its PCR 10 and IMA list (Report
// parses them). Every line it prints for the host starts with Marker.
const Init = Prelude + `echo "VTPM-TEST: start"
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

// Policy is the IMA policy of scripts/e2e/build-guest.sh: measure programs
// run and files root reads, except on pseudo file systems and the ramfs
// scratch.
const Policy = `dont_measure fsmagic=0x9fa0
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

// BusyboxPath is where Find looks for a static busybox.
const BusyboxPath = "/bin/busybox"

// KernelCacheDir is scripts/e2e/lib.sh's e2e_cache_dir: $TPMMUX_E2E_CACHE,
// else $XDG_CACHE_HOME/tpmmux-e2e, else /var/cache/tpmmux-e2e for root,
// else ~/.cache/tpmmux-e2e.
func KernelCacheDir() string {
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

// Kernel returns the newest complete cached bzImage (one whose directory
// has the .complete mark build-guest.sh leaves).
func Kernel() (string, error) {
	marks, _ := filepath.Glob(filepath.Join(KernelCacheDir(), "kernel", "*", ".complete"))
	sort.Strings(marks)
	for i := len(marks) - 1; i >= 0; i-- {
		k := filepath.Join(filepath.Dir(marks[i]), "vmlinuz")
		if _, err := os.Stat(k); err == nil {
			return k, nil
		}
	}
	return "", fmt.Errorf("no cached guest kernel under %s/kernel (run scripts/e2e/build-guest.sh once to fill it)", KernelCacheDir())
}

// Tools are what booting the guest needs from the host.
type Tools struct {
	QEMU    string // qemu-system-x86_64
	Kernel  string // the cached bzImage
	Busybox []byte // a static busybox, the initramfs's every program
}

// Find locates QEMU, busybox and the cached kernel; its error names the
// first one missing and how to install it.
func Find() (*Tools, error) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, errors.New("qemu-system-x86_64 not installed (Debian: apt-get install qemu-system-x86)")
	}
	busybox, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("no %s (Debian: apt-get install busybox-static)", BusyboxPath)
	}
	kernel, err := Kernel()
	if err != nil {
		return nil, err
	}
	return &Tools{QEMU: qemu, Kernel: kernel, Busybox: busybox}, nil
}

// Guest writes an initramfs with init as its /init (Init if "") into dir
// and returns the guest that boots it.
func (t *Tools) Guest(dir, init string) (*Guest, error) {
	if init == "" {
		init = Init
	}
	initrd := filepath.Join(dir, "initrd.img")
	if err := os.WriteFile(initrd, Initramfs(t.Busybox, init), 0o644); err != nil {
		return nil, fmt.Errorf("write guest initramfs: %w", err)
	}
	return &Guest{QEMU: t.QEMU, Kernel: t.Kernel, Initrd: initrd}, nil
}

// Guest is a bootable guest: QEMU, the kernel and the initramfs.
type Guest struct {
	QEMU, Kernel, Initrd string
}

// Args are QEMU's arguments for the guest under TCG on a pc machine, its
// serial console written to the file console, without a TPM (append
// TPMArgs for one).
func (g *Guest) Args(console string) []string {
	return []string{"-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", g.Kernel, "-initrd", g.Initrd, "-append", Cmdline,
		"-chardev", "file,id=con0,path=" + console, "-serial", "chardev:con0"}
}

// TPMArgs are QEMU's arguments for a TPM device of model ("tpm-crb" or
// "tpm-tis") whose TPM emulator backend is the swtpm control-channel
// socket ctrlPath (a bridge-served vTPM or swtpm's --ctrl type=unixio).
func TPMArgs(ctrlPath, model string) []string {
	return []string{"-chardev", "socket,id=chrtpm,path=" + ctrlPath,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", model + ",tpmdev=tpm0"}
}

// Result is one boot: the guest's console and what QEMU took.
type Result struct {
	Console []byte
	Took    time.Duration // wall time from QEMU's start to its exit
	CPU     time.Duration // QEMU's user plus system CPU time
}

// Boot runs the guest in dir (its console is dir/console.log) with extra
// QEMU arguments (TPMArgs, or none) until it powers off. It fails if QEMU
// fails or the console lacks DoneMarker.
func (g *Guest) Boot(ctx context.Context, dir string, extra ...string) (*Result, error) {
	console := filepath.Join(dir, "console.log")
	os.Remove(console)
	cmd := exec.CommandContext(ctx, g.QEMU, append(g.Args(console), extra...)...)
	var qerr bytes.Buffer
	cmd.Stderr = &qerr
	start := time.Now()
	err := cmd.Run()
	r := &Result{Took: time.Since(start)}
	if cmd.ProcessState != nil {
		r.CPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	out, rerr := os.ReadFile(console)
	r.Console = out
	if err != nil {
		return r, fmt.Errorf("qemu after %v: %w\nstderr: %s\nconsole tail: %s", r.Took.Round(time.Millisecond), err, qerr.String(), Tail(out, 3000))
	}
	if rerr != nil {
		return r, fmt.Errorf("guest console: %w", rerr)
	}
	if !bytes.Contains(out, []byte(DoneMarker)) {
		return r, fmt.Errorf("guest did not finish (no %q on its console); console tail:\n%s", DoneMarker, Tail(out, 3000))
	}
	return r, nil
}

// Tail is the last n bytes of a console, for error messages.
func Tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
