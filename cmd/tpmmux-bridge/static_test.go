package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The host build of the bridge (CGO_ENABLED=0, as scripts/package.sh
// builds it) links neither cgo nor the simulator (which needs libcrypto),
// so the daemon runs on a host without them; asked for the simulator it
// names what to use instead.
func TestStaticBuildHasNoSimulator(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := filepath.Join(t.TempDir(), "tpmmux-bridge")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 build: %v\n%s", err, out)
	}
	out, err := exec.Command("go", "version", "-m", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("go version -m: %v\n%s", err, out)
	}
	info := string(out)
	if !strings.Contains(info, "CGO_ENABLED=0") {
		t.Fatalf("build info does not say CGO_ENABLED=0:\n%s", info)
	}
	syms, err := exec.Command("go", "tool", "nm", bin).CombinedOutput()
	if err != nil {
		t.Fatalf("go tool nm: %v", err)
	}
	for _, bad := range []string{"go-tpm-tools/simulator.", " T crosscall2"} {
		if strings.Contains(string(syms), bad) {
			t.Errorf("static bridge contains %q symbols", bad)
		}
	}
	// No ELF interpreter: no dynamic loader, no libc, no libcrypto.
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("the bridge is dynamically linked (has PT_INTERP)")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("the bridge imports shared libraries %v", libs)
	}
	// Asked for the simulator, it says what to use instead.
	dir := t.TempDir()
	res, _ := exec.Command(bin, "run", "--tpm", "sim", "--state-dir", filepath.Join(dir, "state"),
		"--control", filepath.Join(dir, "c.sock"), "--serial-dir", filepath.Join(dir, "serial")).CombinedOutput()
	if !strings.Contains(string(res), "no in-process simulator") || !strings.Contains(string(res), "--tpm swtpm:") {
		t.Fatalf("run --tpm sim on the static build said:\n%s", res)
	}
}
