package swtpmproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// SetupBinary and LocalCABinary are swtpm-tools' manufacturing programs.
const (
	SetupBinary   = "swtpm_setup"
	LocalCABinary = "swtpm_localca"
)

// manufactureTimeout bounds one swtpm_setup run when ctx has no earlier
// deadline (it takes about a second: key generation and certificates).
const manufactureTimeout = time.Minute

// CA is the local certificate authority swtpm_localca keeps in a directory:
// a self-signed root and an intermediate (the issuer) that signs the EK and
// platform certificates.
type CA struct {
	Dir string
}

// RootCert is the path of the CA's self-signed root certificate (PEM).
func (c CA) RootCert() string { return filepath.Join(c.Dir, "swtpm-localca-rootca-cert.pem") }

// IssuerCert is the path of the intermediate that signs EK certificates (PEM).
func (c CA) IssuerCert() string { return filepath.Join(c.Dir, "issuercert.pem") }

// Bundle returns the root and the intermediate as one PEM bundle: what a
// verifier trusts as its EK CA.
func (c CA) Bundle() ([]byte, error) {
	root, err := os.ReadFile(c.RootCert())
	if err != nil {
		return nil, err
	}
	issuer, err := os.ReadFile(c.IssuerCert())
	if err != nil {
		return nil, err
	}
	return append(append(root, '\n'), issuer...), nil
}

// ManufactureAvailable reports whether swtpm_setup and swtpm_localca are
// installed (nil if they are).
func ManufactureAvailable() error {
	for _, b := range []string{SetupBinary, LocalCABinary, Binary} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s not available (Debian: apt-get install swtpm swtpm-tools): %w", b, err)
		}
	}
	return nil
}

// Manufacture provisions a new TPM state in stateDir as a TPM vendor would,
// non-interactively: swtpm_setup creates the RSA 2048 EK (TCG template L-1,
// certificate in NV index 0x01c00002) and an ECC EK with their EK
// certificates and a platform certificate, signed by the local CA in caDir
// (swtpm_localca creates the CA there on first use, so several TPMs can
// share one CA), activates the sha256 PCR bank only, and locks the NV
// indices. The configuration files swtpm_setup and swtpm_localca read are
// written into caDir too; nothing outside stateDir and caDir is touched.
// Start (or StartWith) then runs swtpm on stateDir.
func Manufacture(ctx context.Context, stateDir, caDir string) (CA, error) {
	if err := ManufactureAvailable(); err != nil {
		return CA{}, err
	}
	for _, d := range []string{stateDir, caDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return CA{}, fmt.Errorf("manufacture TPM: %w", err)
		}
	}
	caDir, err := filepath.Abs(caDir)
	if err != nil {
		return CA{}, err
	}
	ca := CA{Dir: caDir}
	files := map[string]string{
		"swtpm-localca.conf": fmt.Sprintf("statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n",
			caDir, filepath.Join(caDir, "signkey.pem"), ca.IssuerCert(), filepath.Join(caDir, "certserial")),
		"swtpm-localca.options": "--platform-manufacturer tpmmux\n--platform-version 2.1\n--platform-model swtpm\n",
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(caDir, name), []byte(content), 0o600); err != nil {
			return CA{}, fmt.Errorf("manufacture TPM: %w", err)
		}
	}
	localca, err := exec.LookPath(LocalCABinary)
	if err != nil {
		return CA{}, err
	}
	setupConf := fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\n",
		localca, filepath.Join(caDir, "swtpm-localca.conf"), filepath.Join(caDir, "swtpm-localca.options"))
	confPath := filepath.Join(caDir, "swtpm_setup.conf")
	if err := os.WriteFile(confPath, []byte(setupConf), 0o600); err != nil {
		return CA{}, fmt.Errorf("manufacture TPM: %w", err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, manufactureTimeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, SetupBinary, "--tpm2", "--tpmstate", stateDir,
		"--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--pcr-banks", "sha256",
		"--config", confPath, "--overwrite")
	// swtpm_setup looks for user configuration under $XDG_CONFIG_HOME and
	// $HOME: point both at caDir so nothing of the caller's is read.
	cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+caDir, "HOME="+caDir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return CA{}, fmt.Errorf("manufacture TPM in %s: %s: %w: %s", stateDir, SetupBinary, err, bytes.TrimSpace(out.Bytes()))
	}
	for _, p := range []string{ca.RootCert(), ca.IssuerCert(), filepath.Join(stateDir, "tpm2-00.permall")} {
		if _, err := os.Stat(p); err != nil {
			return CA{}, errors.Join(fmt.Errorf("manufacture TPM: %s did not create %s", SetupBinary, p), err)
		}
	}
	return ca, nil
}

// ManufactureTest is Manufacture for tests: it skips the test when
// swtpm-tools are missing (fails under CI=true), manufactures a TPM into a
// temporary state directory with the CA in caDir ("" for a temporary one),
// starts swtpm on it and stops it when the test ends.
func ManufactureTest(t TB, caDir string) (*Proc, CA) {
	t.Helper()
	if err := ManufactureAvailable(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true but %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
	if caDir == "" {
		caDir = t.TempDir()
	}
	state := t.TempDir()
	ca, err := Manufacture(t.Context(), state, caDir)
	if err != nil {
		t.Fatalf("%v", err)
	}
	p, err := StartWith(t.Context(), Options{StateDir: state, DieWithParent: true})
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		if err := p.Stop(); err != nil {
			t.Fatalf("%v", err)
		}
	})
	return p, ca
}
