package guestboot

import (
	"bytes"
	"fmt"
)

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

// Initramfs returns a newc cpio initramfs: busybox as /bin/busybox, init
// as /init, Policy as /etc/ima-policy, /dev/console, the mount points
// init uses, and under /opt/vtpm a data file and three tool scripts for
// IMA to measure.
func Initramfs(busybox []byte, init string) []byte {
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "run", "tmp", "opt", "opt/vtpm"} {
		w.dir(d)
	}
	w.entry("dev/console", 0o20600, 5, 1, nil)
	w.file("bin/busybox", 0o755, busybox)
	w.file("init", 0o755, []byte(init))
	w.file("etc/ima-policy", 0o644, []byte(Policy))
	w.file("opt/vtpm/data", 0o644, []byte("data the guest reads\n"))
	for i := 1; i <= 3; i++ {
		w.file(fmt.Sprintf("opt/vtpm/tool-%d", i), 0o755, []byte(fmt.Sprintf("#!/bin/sh\necho tool-%d ran\n", i)))
	}
	return w.close()
}
