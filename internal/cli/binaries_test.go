package cli

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// buildBinaries builds the four binaries as the package ships them
// (CGO_ENABLED=0).
func buildBinaries(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the four binaries")
	}
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "../../cmd/tpmmux-bridge", "../../cmd/tpmmux-hook", "../../cmd/tpmmux-verify", "../../cmd/tpmmux-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

type ran struct {
	code           int
	stdout, stderr string
}

func runBin(t *testing.T, bin string, args ...string) ran {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stdin = strings.NewReader("")
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := ran{stdout: o.String(), stderr: e.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return r
}

// commands is every binary and subcommand, with what its --help must say.
var commands = []struct {
	bin  string
	sub  []string
	want []string
}{
	{"tpmmux-bridge", nil, []string{"run", "status", "vms", "evidence", "enroll-request", "enroll-answer", "violation", "demo"}},
	{"tpmmux-bridge", []string{"run"}, []string{"--config FILE", "--tpm TPM", "--state-dir DIR"}},
	{"tpmmux-bridge", []string{"status"}, []string{"--control PATH"}},
	{"tpmmux-bridge", []string{"vms"}, []string{"--all"}},
	{"tpmmux-bridge", []string{"evidence"}, []string{"--vm NAME", "--nonce HEX", "--out DIR"}},
	{"tpmmux-bridge", []string{"enroll-request"}, []string{"--out FILE"}},
	{"tpmmux-bridge", []string{"enroll-answer"}, []string{"--challenge FILE"}},
	{"tpmmux-bridge", []string{"violation"}, []string{"--reason TEXT", "--report FILE"}},
	{"tpmmux-bridge", []string{"demo"}, []string{"--vms N"}},
	{"tpmmux-hook", nil, []string{"hook.json", "control_socket", "fail_open", "mode", "serial_dir", "timeout"}},
	{"tpmmux-verify", nil, []string{"--evidence FILE", "--nonce HEX", "--enrolled DIR", "enroll"}},
	{"tpmmux-verify", []string{"enroll"}, []string{"challenge", "finish", "list"}},
	{"tpmmux-verify", []string{"enroll", "challenge"}, []string{"--request FILE", "--ek-ca FILE"}},
	{"tpmmux-verify", []string{"enroll", "finish"}, []string{"--answer FILE", "--enrolled DIR"}},
	{"tpmmux-verify", []string{"enroll", "list"}, []string{"--enrolled DIR"}},
	{"tpmmux-agent", nil, []string{"run", "attest", "bind"}},
	{"tpmmux-agent", []string{"run"}, []string{"--transport KIND", "--ima FILE"}},
	{"tpmmux-agent", []string{"attest"}, []string{"--nonce HEX", "--out DIR"}},
	{"tpmmux-agent", []string{"bind"}, []string{"--purpose NAME", "--key FILE"}},
}

// A flag line of --help: "  --name PLACEHOLDER   usage".
var flagLine = regexp.MustCompile(`^  (-{1,2}[a-z][a-z0-9-]*)(?: (\S+))?(?:  |$)`)

// Every binary and subcommand: --help exits 0 with the help on stdout and
// nothing on stderr, its placeholders are single upper-case words (not
// garbled text such as "-vm vms --all"), --version prints the version, and
// an unknown flag is a usage error (exit 2) that points to --help.
func TestHelpVersionUsage(t *testing.T) {
	dir := buildBinaries(t)
	placeholder := regexp.MustCompile(`^[A-Z][A-Z0-9_]*$`)
	for _, c := range commands {
		name := strings.TrimSpace(c.bin + " " + strings.Join(c.sub, " "))
		t.Run(name, func(t *testing.T) {
			bin := filepath.Join(dir, c.bin)
			for _, h := range []string{"--help", "-h"} {
				r := runBin(t, bin, append(append([]string{}, c.sub...), h)...)
				if r.code != 0 || r.stderr != "" || !strings.HasPrefix(r.stdout, "usage: "+name) {
					t.Fatalf("%s %s: exit %d, stdout %q, stderr %q", name, h, r.code, r.stdout, r.stderr)
				}
				for _, w := range c.want {
					if !strings.Contains(r.stdout, w) {
						t.Errorf("%s --help lacks %q:\n%s", name, w, r.stdout)
					}
				}
				flags := 0
				for _, l := range strings.Split(r.stdout, "\n") {
					m := flagLine.FindStringSubmatch(l)
					if m == nil {
						continue
					}
					flags++
					if m[2] != "" && !placeholder.MatchString(m[2]) {
						t.Errorf("%s: flag %s has the placeholder %q", name, m[1], m[2])
					}
				}
				if flags < 2 {
					t.Errorf("%s --help lists %d flags, want at least --help and --version", name, flags)
				}
			}
			r := runBin(t, bin, append(append([]string{}, c.sub...), "--version")...)
			if r.code != 0 || r.stdout != c.bin+" "+Version+"\n" {
				t.Fatalf("%s --version: exit %d, %q", name, r.code, r.stdout)
			}
			if c.bin == "tpmmux-hook" {
				return // argv is libvirt's: DOMAIN OP SUBOP
			}
			r = runBin(t, bin, append(append([]string{}, c.sub...), "--no-such-flag")...)
			if r.code != ExitUsage || !strings.Contains(r.stderr, "usage error") || !strings.Contains(r.stderr, "--help") {
				t.Fatalf("%s --no-such-flag: exit %d, stderr %q", name, r.code, r.stderr)
			}
		})
	}
}

// The man page of each binary comes from the same descriptions as --help:
// it names every flag every --help lists, and groff reads it without a
// warning.
func TestManPages(t *testing.T) {
	dir := buildBinaries(t)
	for _, b := range []string{"tpmmux-bridge", "tpmmux-hook", "tpmmux-verify", "tpmmux-agent"} {
		t.Run(b, func(t *testing.T) {
			r := runBin(t, filepath.Join(dir, b), "--man")
			if r.code != 0 || !strings.HasPrefix(r.stdout, ".TH "+strings.ToUpper(b)+" ") {
				t.Fatalf("--man: exit %d, %q", r.code, r.stderr)
			}
			man := strings.ReplaceAll(r.stdout, `\-`, "-")
			for _, c := range commands {
				if c.bin != b {
					continue
				}
				// Subcommands of subcommands (verify enroll challenge)
				// are in their parent's page only when it lists them.
				if len(c.sub) > 1 {
					continue
				}
				h := runBin(t, filepath.Join(dir, b), append(append([]string{}, c.sub...), "--help")...)
				for _, l := range strings.Split(h.stdout, "\n") {
					if m := flagLine.FindStringSubmatch(l); m != nil && !strings.Contains(man, m[1]) {
						t.Errorf("man page of %s lacks %s (from %v --help)", b, m[1], c.sub)
					}
				}
			}
			if _, err := exec.LookPath("groff"); err != nil {
				t.Log("no groff: roff not checked")
				return
			}
			g := exec.Command("groff", "-man", "-Tutf8", "-ww", "-z")
			g.Stdin = strings.NewReader(r.stdout)
			if out, err := g.CombinedOutput(); err != nil || len(out) > 0 {
				t.Fatalf("groff: %v\n%s", err, out)
			}
		})
	}
}
