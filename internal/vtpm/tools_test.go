package vtpm_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tpmmux/tpmmux/internal/vtpm"
	"github.com/tpmmux/tpmmux/internal/vtpm/vpcr"
	"github.com/tpmmux/tpmmux/internal/vtpm/vtpmtest"
)

// stdioBridgeEnv makes the test binary a stdin/stdout <-> unix socket relay
// (what tpm2-tools' cmd TCTI runs), instead of running tests.
const stdioBridgeEnv = "TPMMUX_VTPM_STDIO_BRIDGE"

func TestMain(m *testing.M) {
	if path := os.Getenv(stdioBridgeEnv); path != "" {
		os.Exit(stdioBridge(path))
	}
	os.Exit(m.Run())
}

func stdioBridge(path string) int {
	c, err := net.Dial("unix", path)
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		return 1
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); io.Copy(os.Stdout, c) }()
	io.Copy(c, os.Stdin)
	c.(*net.UnixConn).CloseWrite()
	wg.Wait()
	return 0
}

// TestTPM2Tools runs tpm2-tools against the vTPM's data channel through
// the cmd TCTI (tpm2-tss 3.2 has no unix-socket form of the swtpm TCTI;
// the cmd TCTI speaks raw TPM commands over a child's stdin/stdout, and
// the child here is this test binary relaying to a data socket).
func TestTPM2Tools(t *testing.T) {
	for _, tool := range []string{"tpm2_pcrread", "tpm2_getcap", "tpm2_pcrextend"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian: tpm2-tools)", tool)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	j := &vtpmtest.Journal{}
	v, err := vtpm.New(vtpm.Config{Journal: j, Logger: quietLog()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Init(ctx)
	if got := v.Execute(ctx, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}); got[9] != 0 {
		t.Fatalf("Startup: %x", got)
	}
	path := filepath.Join(t.TempDir(), "data.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			if err := v.ServeData(ctx, c); err != nil && !errors.Is(err, context.Canceled) {
				t.Logf("ServeData: %v", err)
			}
		}
	}()
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(args[0], append(args[1:], "-T", "cmd:"+self)...)
		cmd.Env = append(os.Environ(), stdioBridgeEnv+"="+path)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	d := sha256.Sum256([]byte("tpm2-tools"))
	run("tpm2_pcrextend", "10:sha256="+hex.EncodeToString(d[:]))
	out := run("tpm2_pcrread", "sha256:10,16,17")
	want := extendOf(make([]byte, 32), d[:])
	if !strings.Contains(strings.ToUpper(out), strings.ToUpper(hex.EncodeToString(want))) {
		t.Fatalf("tpm2_pcrread output lacks PCR 10 = %x:\n%s", want, out)
	}
	if !strings.Contains(out, "0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF") {
		t.Fatalf("tpm2_pcrread: PCR 17 not all ones:\n%s", out)
	}
	for _, capName := range []string{"pcrs", "commands", "properties-fixed", "properties-variable", "algorithms", "handles-pcr"} {
		out := run("tpm2_getcap", capName)
		t.Logf("tpm2_getcap %s: %d lines", capName, strings.Count(out, "\n"))
		if capName == "pcrs" && (!strings.Contains(out, "sha1") || !strings.Contains(out, "sha256")) {
			t.Fatalf("tpm2_getcap pcrs:\n%s", out)
		}
		if capName == "properties-fixed" && !strings.Contains(out, "TMUX") {
			t.Fatalf("tpm2_getcap properties-fixed lacks the manufacturer:\n%s", out)
		}
	}
	if got := v.PCRs().Read(vpcr.SHA256, 10); string(got) != string(want) {
		t.Fatalf("vPCR 10 %x", got)
	}
}
