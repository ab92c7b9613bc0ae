package vtpm_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/guestboot"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// migrateInit is the migration guest's /init: it keeps running programs
// (each one an IMA measurement, hence a PCR 10 extend) and printing its
// PCR 10, long enough to be live-migrated in the middle, then prints its
// IMA list and powers off.
const migrateInit = guestboot.Prelude + `cat /etc/ima-policy >/sys/kernel/security/ima/policy
echo "VTPM-TEST: ready"
i=0
while [ ! -e /sys/kernel/security/ima/ascii_runtime_measurements ] || [ $i -lt 40 ]; do
  i=$((i+1))
  printf '#!/bin/sh\necho step %s\n' $i >/tmp/step-$i
  chmod +x /tmp/step-$i
  /tmp/step-$i >/dev/null
  echo "VTPM-TEST: step $i $(cat /sys/class/tpm/tpm0/pcr-sha256/10)"
  sleep 0.25
done
a=$(cat /sys/class/tpm/tpm0/pcr-sha256/10)
cp /sys/kernel/security/ima/binary_runtime_measurements /run/ima.bin
echo "VTPM-TEST: pcr10-sha256 $a"
echo "VTPM-TEST: ima-begin"
base64 /run/ima.bin | sed 's/^/VTPM-TEST: b64 /'
echo "VTPM-TEST: done"
poweroff -f
`

// qmp is a minimal QMP client: one command at a time.
type qmp struct {
	c  net.Conn
	sc *bufio.Scanner
}

func dialQMP(t *testing.T, path string) *qmp {
	t.Helper()
	var c net.Conn
	var err error
	for range 100 {
		if c, err = net.Dial("unix", path); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("qmp %s: %v", path, err)
	}
	q := &qmp{c: c, sc: bufio.NewScanner(c)}
	q.sc.Buffer(make([]byte, 1<<20), 1<<20)
	q.sc.Scan() // greeting
	q.do(t, "qmp_capabilities", nil)
	return q
}

// do runs a command and returns its "return" value, skipping events.
func (q *qmp) do(t *testing.T, cmd string, args any) json.RawMessage {
	t.Helper()
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := q.c.Write(append(b, '\n')); err != nil {
		t.Fatalf("qmp %s: %v", cmd, err)
	}
	for q.sc.Scan() {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(q.sc.Bytes(), &resp); err != nil {
			t.Fatalf("qmp %s: %v", cmd, err)
		}
		if resp.Event != "" {
			continue
		}
		if resp.Error != nil {
			t.Fatalf("qmp %s: %s", cmd, resp.Error.Desc)
		}
		return resp.Return
	}
	t.Fatalf("qmp %s: connection closed: %v", cmd, q.sc.Err())
	return nil
}

// TestQEMULiveMigration live-migrates a running IMA guest between two QEMU
// processes, each with its TPM emulator backend on a bridge-served vTPM:
// the source's a running one, the destination's a vTPM of a VM migrating
// in. QEMU moves the vTPM through GET/SET_STATEBLOB and the resume INIT; the
// destination journals nothing until the handover (here: Adopt with the
// source's vPCR snapshot, what the bridges hand over), and the guest's PCR
// 10 is continuous: its IMA list, measured on both hosts, replays to the
// PCR 10 it reads at the end, which equals the replay of the source's
// events and then the destination's on top of the snapshot.
func TestQEMULiveMigration(t *testing.T) {
	dir := t.TempDir()
	g, err := guestTools(t).Guest(dir, migrateInit)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	var srcTrace, dstTrace traceLog
	sj, dj := &vtpmtest.Journal{}, &vtpmtest.Journal{}
	src, err := vtpm.New(vtpm.Config{Journal: sj, Logger: quietLog(), Trace: srcTrace.record}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := vtpm.New(vtpm.Config{Journal: dj, Logger: quietLog(), Trace: dstTrace.record, Incoming: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	srcDir, dstDir := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	os.Mkdir(srcDir, 0o755)
	os.Mkdir(dstDir, 0o755)
	srcCtrl, _ := serveVTPM(t, ctx, src, srcDir)
	dstCtrl, _ := serveVTPM(t, ctx, dst, dstDir)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	start := func(d, ctrl string, extra ...string) (*exec.Cmd, *bytes.Buffer) {
		args := append(g.Args(filepath.Join(d, "console.log")), "-qmp", "unix:"+filepath.Join(d, "qmp.sock")+",server=on,wait=off")
		args = append(args, guestboot.TPMArgs(ctrl, "tpm-crb")...)
		cmd := exec.CommandContext(ctx, g.QEMU, append(args, extra...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd, &stderr
	}
	_, srcErr := start(srcDir, srcCtrl)
	dstCmd, dstErr := start(dstDir, dstCtrl, "-incoming", fmt.Sprintf("tcp:127.0.0.1:%d", port))

	// Wait until the guest is measuring on the source.
	srcConsole := filepath.Join(srcDir, "console.log")
	waitFor := func(path, what string) {
		t.Helper()
		for ctx.Err() == nil {
			b, _ := os.ReadFile(path)
			if bytes.Contains(b, []byte(what)) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		b, _ := os.ReadFile(path)
		t.Fatalf("%q never appeared in %s:\n%s\nsource qemu: %s\ndestination qemu: %s", what, path, guestboot.Tail(b, 3000), srcErr, dstErr)
	}
	waitFor(srcConsole, "VTPM-TEST: step 5 ")

	sq := dialQMP(t, filepath.Join(srcDir, "qmp.sock"))
	began := time.Now()
	sq.do(t, "migrate", map[string]any{"uri": fmt.Sprintf("tcp:127.0.0.1:%d", port)})
	var status string
	for ctx.Err() == nil {
		var st struct {
			Status string `json:"status"`
		}
		json.Unmarshal(sq.do(t, "query-migrate", nil), &st)
		status = st.Status
		if status == "completed" || status == "failed" || status == "cancelled" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if status != "completed" {
		t.Fatalf("migration %s; source qemu: %s; destination qemu: %s", status, srcErr, dstErr)
	}
	took := time.Since(began)
	if ev := dj.Events(); len(ev) != 0 {
		t.Fatalf("the destination journaled %v before the handover", ev)
	}
	// The handover: the source's vPCRs, as the bridges pass them on.
	snap := src.PCRs().Snapshot()
	srcEvents := sj.Events()
	if err := dst.Adopt(snap, nil); err != nil {
		t.Fatal(err)
	}
	if err := dstCmd.Wait(); err != nil {
		t.Fatalf("destination qemu: %v: %s", err, dstErr)
	}
	out, _ := os.ReadFile(filepath.Join(dstDir, "console.log"))
	all := append(mustRead(t, srcConsole), out...)

	var pcr10 string
	var b64 strings.Builder
	lastSrc, firstDst := 0, 0
	sc := bufio.NewScanner(bytes.NewReader(all))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	srcLen := len(mustRead(t, srcConsole))
	off := 0
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		off += len(sc.Bytes()) + 1
		i := strings.Index(line, "VTPM-TEST: ")
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+len("VTPM-TEST: "):])
		switch {
		case len(f) == 3 && f[0] == "step":
			var n int
			fmt.Sscan(f[1], &n)
			if off <= srcLen {
				lastSrc = n
			} else if firstDst == 0 {
				firstDst = n
			}
		case len(f) == 2 && f[0] == "pcr10-sha256":
			pcr10 = f[1]
		case len(f) == 2 && f[0] == "b64":
			b64.WriteString(f[1])
		}
	}
	if pcr10 == "" || lastSrc == 0 || firstDst == 0 {
		t.Fatalf("guest did not run on both sides (last step on the source %d, first on the destination %d, pcr10 %q); destination console:\n%s", lastSrc, firstDst, pcr10, guestboot.Tail(out, 3000))
	}
	list, err := base64.StdEncoding.DecodeString(b64.String())
	if err != nil {
		t.Fatal(err)
	}
	entries, err := ima.ParseList(list)
	if err != nil {
		t.Fatal(err)
	}
	replay := make([]byte, 32)
	for _, e := range entries {
		h := sha256.New()
		h.Write(replay)
		h.Write(e.ExtendDigest(crypto.SHA256))
		replay = h.Sum(nil)
	}
	guest, _ := hex.DecodeString(pcr10)
	if !bytes.Equal(replay, guest) {
		t.Fatalf("the guest's IMA list (%d entries) replays to %x, its PCR 10 reads %x", len(entries), replay, guest)
	}
	final, err := vpcr.ReplayFrom(nil, snap, dj.Events())
	if err != nil {
		t.Fatal(err)
	}
	if got := final.Read(vpcr.SHA256, 10); !bytes.Equal(got, guest) {
		t.Fatalf("source events + destination events replay PCR 10 to %x, the guest read %x", got, guest)
	}
	if !dst.PCRs().Equal(final) {
		t.Fatal("the destination's vPCRs are not the replay of the snapshot and its journal")
	}
	var dstExtends int
	for _, e := range dj.Events() {
		if e.Kind == vpcr.KindInit || e.Kind == vpcr.KindStartup {
			t.Fatalf("the migration journaled %v on the destination: a resume is not a reboot", e)
		}
		if e.Kind == vpcr.KindExtend {
			dstExtends++
		}
	}
	if dstExtends == 0 {
		t.Fatal("no extend journaled on the destination")
	}
	t.Logf("migrated after step %d (the destination ran from step %d) in %v; %d IMA entries, %d events on the source, %d on the destination",
		lastSrc, firstDst, took.Round(time.Millisecond), len(entries), len(srcEvents), len(dj.Events()))
	srcTrace.mu.Lock()
	dstTrace.mu.Lock()
	t.Logf("source control commands: %v", srcTrace.control)
	t.Logf("destination control commands: %v", dstTrace.control)
	srcTrace.mu.Unlock()
	dstTrace.mu.Unlock()
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
