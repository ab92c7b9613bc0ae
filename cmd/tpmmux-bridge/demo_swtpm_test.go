package main

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/mux"
	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// These tests run the demo in-process. The "sim" TPM is a process-wide
// singleton, so none of them runs in parallel.

const demoVMs = 3

func demoLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// runDemo runs the demo on spec with --out and returns the out directory.
func runDemo(t *testing.T, spec string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	var buf bytes.Buffer
	if err := demo(t.Context(), demoConfig{vms: demoVMs, records: 10, tpm: spec, out: out, log: demoLog(t)}, &buf); err != nil {
		t.Fatalf("demo on %s: %v\n%s", spec, err, buf.String())
	}
	if !strings.Contains(buf.String(), "every VM verified") {
		t.Fatalf("demo on %s did not say every VM verified:\n%s", spec, buf.String())
	}
	return out
}

func vmName(i int) string { return fmt.Sprintf("vm-%02d", i+1) }

// needTool skips without the tpm2-tools program name, or fails under CI,
// which installs them.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %s is not installed (Debian: apt-get install tpm2-tools): %v", name, err)
		}
		t.Skipf("skipping: %s not installed (Debian: apt-get install tpm2-tools)", name)
	}
	return p
}

func TestDemoSim(t *testing.T) {
	var buf bytes.Buffer
	if err := demo(t.Context(), demoConfig{vms: demoVMs, records: 5, tpm: "sim", log: demoLog(t)}, &buf); err != nil {
		t.Fatalf("demo: %v\n%s", err, buf.String())
	}
	if !strings.Contains(buf.String(), "every VM verified") {
		t.Errorf("demo output lacks %q:\n%s", "every VM verified", buf.String())
	}
	for i := range demoVMs {
		if !strings.Contains(buf.String(), vmName(i)) {
			t.Errorf("demo output does not list %s", vmName(i))
		}
	}
}

func readEvidence(t *testing.T, path string) *evidence.Evidence {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := evidence.Decode(b)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return ev
}

// replayLog folds the evidence's public log into the PCR value it extends
// to (docs/protocol.md, Group commit), computed here with conceal alone.
func replayLog(t *testing.T, ev *evidence.Evidence) conceal.Digest {
	t.Helper()
	var pcr conceal.Digest
	var next uint64
	for i, b := range ev.Log {
		if b.G0 != next {
			t.Fatalf("batch %d starts at %d, want %d", i, b.G0, next)
		}
		var leaves []conceal.Digest
		if i == 0 {
			leaves = append(leaves, conceal.EpochLeaf(ev.Epoch.Record))
		}
		for j := range b.Entries.Len() {
			leaves = append(leaves, conceal.Leaf(b.Entries.At(j)))
		}
		pcr = conceal.ExtendPCR(pcr, conceal.BatchDigest(b.G0, leaves))
		next += uint64(len(leaves))
	}
	return pcr
}

// quotedPCR returns the evidence's claimed value of the mux PCR.
func quotedPCR(t *testing.T, ev *evidence.Evidence) []byte {
	t.Helper()
	for _, pv := range ev.PCRValues {
		if pv.Index == mux.DefaultPCR {
			return pv.SHA256
		}
	}
	t.Fatalf("evidence has no value for PCR %d", mux.DefaultPCR)
	return nil
}

var pcrreadLine = regexp.MustCompile(`(?m)^\s*` + strconv.Itoa(mux.DefaultPCR) + `\s*:\s*0x([0-9A-Fa-f]{64})\s*$`)

// TestDemoSwtpmCrossCheck runs the demo on a real swtpm and checks its
// output with the TPM's own tools: the PCR the demo's log replays to is the
// PCR tpm2_pcrread reads, and tpm2_checkquote accepts the quotes.
func TestDemoSwtpmCrossCheck(t *testing.T) {
	sw := swtpmproc.StartTest(t)
	pcrread := needTool(t, "tpm2_pcrread")
	checkquote := needTool(t, "tpm2_checkquote")
	out := runDemo(t, sw.Spec())

	// The demo tore the VMs down after writing evidence.json, so more
	// batches followed; the post-mortem quote of the last VM torn down
	// covers the whole log. Take the final evidence with the longest log.
	var last *evidence.Evidence
	for i := range demoVMs {
		ev := readEvidence(t, filepath.Join(out, vmName(i), "final-evidence.json"))
		if last == nil || len(ev.Log) > len(last.Log) {
			last = ev
		}
	}
	want := replayLog(t, last)
	if q := quotedPCR(t, last); !bytes.Equal(q, want[:]) {
		t.Errorf("final evidence quotes PCR %d = %x, its log replays to %x", mux.DefaultPCR, q, want)
	}
	// Each VM's fresh evidence: its log replays to the PCR it quotes and
	// is a strict prefix of the final log.
	for i := range demoVMs {
		ev := readEvidence(t, filepath.Join(out, vmName(i), "evidence.json"))
		got := replayLog(t, ev)
		if q := quotedPCR(t, ev); !bytes.Equal(q, got[:]) {
			t.Errorf("%s evidence.json quotes PCR %d = %x, its log replays to %x", vmName(i), mux.DefaultPCR, q, got)
		}
		if len(ev.Log) >= len(last.Log) {
			t.Errorf("%s evidence.json has %d batches, the final log %d: teardowns should have added batches", vmName(i), len(ev.Log), len(last.Log))
			continue
		}
		for j, b := range ev.Log {
			if b.G0 != last.Log[j].G0 || !bytes.Equal(b.Entries, last.Log[j].Entries) {
				t.Errorf("%s evidence.json batch %d differs from the final log's", vmName(i), j)
				break
			}
		}
	}

	// The demo has closed its TPM connection: swtpm serves tpm2-tools now.
	tcti := fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", sw.Port())
	cmd := exec.CommandContext(t.Context(), pcrread, "-T", tcti, fmt.Sprintf("sha256:%d", mux.DefaultPCR))
	pcrOut, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, pcrOut)
	}
	mm := pcrreadLine.FindSubmatch(pcrOut)
	if mm == nil {
		t.Fatalf("no PCR %d value in tpm2_pcrread output:\n%s", mux.DefaultPCR, pcrOut)
	}
	tpmVal, _ := hex.DecodeString(string(mm[1]))
	if !bytes.Equal(tpmVal, want[:]) {
		t.Errorf("tpm2_pcrread: PCR %d = %x, the demo's final log replays to %x", mux.DefaultPCR, tpmVal, want)
	}

	ak := filepath.Join(out, "ak.pem")
	file := func(vm int, name string) string { return filepath.Join(out, vmName(vm), name) }
	extra := func(vm int) string {
		b, err := os.ReadFile(file(vm, "extradata.hex"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	flipped := func(vm int, name string, off int) string {
		b, err := os.ReadFile(file(vm, name))
		if err != nil {
			t.Fatal(err)
		}
		if off < 0 {
			off += len(b)
		}
		b[off] ^= 0x01
		p := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// tpm2-tools 5.4 mishandles "-f values -l" with 8 or more PCRs, so the
	// PCR values are not passed: checkquote checks the signature over the
	// whole message (which holds the PCR digest) and the qualifying data.
	cases := []struct {
		name     string
		msg, sig string
		q        string
		ok       bool
	}{
		{"vm-01 own quote", file(0, "quote.msg"), file(0, "quote.sig"), extra(0), true},
		{"vm-02 own quote", file(1, "quote.msg"), file(1, "quote.sig"), extra(1), true},
		{"vm-03 own quote", file(2, "quote.msg"), file(2, "quote.sig"), extra(2), true},
		{"flipped magic byte in quote.msg", flipped(0, "quote.msg", 0), file(0, "quote.sig"), extra(0), false},
		{"flipped middle byte in quote.msg", flipped(0, "quote.msg", 40), file(0, "quote.sig"), extra(0), false},
		{"flipped PCR digest byte in quote.msg", flipped(0, "quote.msg", -1), file(0, "quote.sig"), extra(0), false},
		{"flipped byte in quote.sig", file(0, "quote.msg"), flipped(0, "quote.sig", -1), extra(0), false},
		{"another VM's extraData", file(0, "quote.msg"), file(0, "quote.sig"), extra(1), false},
		{"another VM's signature", file(0, "quote.msg"), file(1, "quote.sig"), extra(0), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), checkquote, "-u", ak, "-m", tc.msg, "-s", tc.sig, "-g", "sha256", "-q", tc.q)
			outb, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			switch {
			case tc.ok && err != nil:
				t.Errorf("tpm2_checkquote rejected a genuine quote: %v\n%s", err, outb)
			case !tc.ok && err == nil:
				t.Errorf("tpm2_checkquote accepted a bad quote:\n%s", outb)
			case !tc.ok && !errors.As(err, &ee):
				t.Errorf("tpm2_checkquote did not run: %v", err)
			}
		})
	}
}

// buildVerifier builds cmd/tpmmux-verify into a temporary directory.
func buildVerifier(t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, err := os.Stat(goBin); err != nil {
			t.Skipf("skipping: no go command to build tpmmux-verify: %v", err)
		}
	}
	bin := filepath.Join(t.TempDir(), "tpmmux-verify")
	cmd := exec.CommandContext(t.Context(), goBin, "build", "-o", bin, "github.com/tpmmux/tpmmux/cmd/tpmmux-verify")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build tpmmux-verify: %v\n%s", err, out)
	}
	return bin
}

// TestVerifyCLIOnDemoFiles runs the built tpmmux-verify against the files
// the demo writes with --out and checks its exit-code contract: 0 trusted,
// 1 rejected (stderr starts "rejected:"), 2 usage or I/O error.
func TestVerifyCLIOnDemoFiles(t *testing.T) {
	bin := buildVerifier(t)
	out := runDemo(t, "sim")
	f := func(vm int, name string) string { return filepath.Join(out, vmName(vm), name) }
	nonce := func(vm int) string {
		b, err := os.ReadFile(f(vm, "nonce.hex"))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	ak := filepath.Join(out, "ak.pem")
	missing := filepath.Join(out, "no-such-file.json")
	cases := []struct {
		name   string
		args   []string
		code   int
		stdout string // prefix, when set
		stderr string // prefix, when set
	}{
		{"own files json", []string{"--evidence", f(0, "evidence.json"), "--nonce", nonce(0), "--identity", f(0, "identity.json"), "--ak", ak}, 0, "trusted:", ""},
		{"own files cbor", []string{"--evidence", f(1, "evidence.cbor"), "--nonce", nonce(1), "--identity", f(1, "identity.json"), "--ak", ak}, 0, "trusted:", ""},
		{"another VM's identity", []string{"--evidence", f(0, "evidence.json"), "--nonce", nonce(0), "--identity", f(1, "identity.json"), "--ak", ak}, 1, "", "rejected:"},
		{"another VM's nonce", []string{"--evidence", f(0, "evidence.json"), "--nonce", nonce(1), "--identity", f(0, "identity.json"), "--ak", ak}, 1, "", "rejected:"},
		{"fresh evidence offered as post-mortem", []string{"--evidence", f(0, "evidence.json"), "--post-mortem", "--identity", f(0, "identity.json"), "--ak", ak}, 1, "", "rejected:"},
		{"missing evidence file", []string{"--evidence", missing, "--nonce", nonce(0), "--identity", f(0, "identity.json"), "--ak", ak}, 2, "", ""},
		{"missing identity file", []string{"--evidence", f(0, "evidence.json"), "--nonce", nonce(0), "--identity", missing, "--ak", ak}, 2, "", ""},
		{"missing ak file", []string{"--evidence", f(0, "evidence.json"), "--nonce", nonce(0), "--identity", f(0, "identity.json"), "--ak", missing}, 2, "", ""},
		{"post-mortem own final evidence", []string{"--evidence", f(2, "final-evidence.json"), "--post-mortem", "--identity", f(2, "identity.json"), "--ak", ak}, 0, "trusted:", ""},
		{"post-mortem another VM's identity", []string{"--evidence", f(2, "final-evidence.json"), "--post-mortem", "--identity", f(0, "identity.json"), "--ak", ak}, 1, "", "rejected:"},
		{"final evidence without --post-mortem", []string{"--evidence", f(2, "final-evidence.json"), "--nonce", nonce(2), "--identity", f(2, "identity.json"), "--ak", ak}, 2, "", "usage error: --evidence"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.CommandContext(t.Context(), bin, tc.args...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			code := 0
			if err != nil {
				var ee *exec.ExitError
				if !errors.As(err, &ee) {
					t.Fatalf("run tpmmux-verify: %v", err)
				}
				code = ee.ExitCode()
			}
			if code != tc.code {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, stdout.String(), stderr.String())
			}
			if tc.stdout != "" && !strings.HasPrefix(stdout.String(), tc.stdout) {
				t.Errorf("stdout %q does not start with %q", stdout.String(), tc.stdout)
			}
			if tc.stderr != "" && !strings.HasPrefix(stderr.String(), tc.stderr) {
				t.Errorf("stderr %q does not start with %q", stderr.String(), tc.stderr)
			}
		})
	}
}
