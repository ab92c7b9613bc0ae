package guestboot

import (
	"bufio"
	"bytes"
	"crypto"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/tpmmux/tpmmux/internal/ima"
)

// Report is what Init printed on the guest's console.
type Report struct {
	Done         bool // DoneMarker seen
	PolicyLoaded bool // /init loaded Policy
	// PCR10SHA256 and PCR10After are the guest's PCR 10 (sha256 bank, hex)
	// read just before and just after it copied its IMA list; they differ
	// if a measurement came in between.
	PCR10SHA256, PCR10After string
	PCR10SHA1               string // PCR 10 in the sha1 bank, hex
	PCR10BeforeUserCmds     string // sha256 PCR 10 before guest root's raw TPM commands
	// TPMCmds is each raw TPM command's response (hex) by name, as guest
	// root got it through /dev/tpm0 ("startup", "reset10", …).
	TPMCmds map[string]string
	Dmesg   []string // the kernel's tpm and ima lines
	Bypass  bool     // IMA said it runs in TPM-bypass mode (no TPM found)
	IMAList []byte   // the binary_runtime_measurements /init copied
}

// ParseReport parses a console Init wrote; only a malformed IMA list is an
// error (a guest that did not finish has Done false).
func ParseReport(console []byte) (*Report, error) {
	r := &Report{TPMCmds: map[string]string{}, Bypass: bytes.Contains(console, []byte("TPM-bypass"))}
	var b64 strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(console))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		i := strings.Index(line, Marker)
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+len(Marker):])
		if len(f) == 0 {
			continue
		}
		switch {
		case f[0] == "pcr10-sha256" && len(f) == 3:
			r.PCR10SHA256, r.PCR10After = f[1], f[2]
		case f[0] == "pcr10-sha1" && len(f) == 2:
			r.PCR10SHA1 = f[1]
		case f[0] == "b64" && len(f) == 2:
			b64.WriteString(f[1])
		case f[0] == "tpmcmd" && len(f) == 3:
			r.TPMCmds[f[1]] = f[2]
		case f[0] == "pcr10-before-user-cmds" && len(f) == 2:
			r.PCR10BeforeUserCmds = f[1]
		case f[0] == "dmesg":
			d := strings.Join(f[1:], " ")
			r.Dmesg = append(r.Dmesg, d)
			r.Bypass = r.Bypass || strings.Contains(d, "TPM-bypass")
		case f[0] == "policy":
			r.PolicyLoaded = true
		case f[0] == "done":
			r.Done = true
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("guest console: %w", err)
	}
	list, err := base64.StdEncoding.DecodeString(b64.String())
	if err != nil {
		return nil, fmt.Errorf("guest IMA list: %w", err)
	}
	r.IMAList = list
	return r, nil
}

// IMAFacts are the checked facts of a guest's IMA on its TPM.
type IMAFacts struct {
	Entries       []ima.Entry // the guest's IMA list, boot_aggregate first
	BootAggregate []byte      // its digest (sha256), not zero
	PCR10         []byte      // the guest's PCR 10 (sha256 bank), the replay of Entries
}

// CheckIMA checks that IMA measured into the guest's TPM: the guest
// finished with its policy loaded, IMA found the TPM (no TPM-bypass), PCR
// 10 did not move while the list was copied, the list parses and starts
// with a non-zero sha256 boot_aggregate, and its replay in the sha256 bank
// equals the guest's PCR 10.
func (r *Report) CheckIMA() (*IMAFacts, error) {
	if !r.Done || !r.PolicyLoaded {
		return nil, fmt.Errorf("guest did not finish (done %v, policy loaded %v)", r.Done, r.PolicyLoaded)
	}
	if r.Bypass {
		return nil, errors.New("IMA ran in TPM-bypass mode: the guest found no TPM")
	}
	if r.PCR10SHA256 == "" || r.PCR10SHA256 != r.PCR10After {
		return nil, fmt.Errorf("guest PCR 10 %q then %q (changed while the list was copied, or unreadable)", r.PCR10SHA256, r.PCR10After)
	}
	pcr10, err := hex.DecodeString(r.PCR10SHA256)
	if err != nil || len(pcr10) != 32 {
		return nil, fmt.Errorf("guest PCR 10 %q is not a sha256 digest in hex", r.PCR10SHA256)
	}
	entries, err := ima.ParseList(r.IMAList)
	if err != nil {
		return nil, fmt.Errorf("parse guest IMA list: %w", err)
	}
	if len(entries) == 0 || entries[0].Fields.Path != "boot_aggregate" {
		return nil, fmt.Errorf("guest IMA list of %d entries does not start with boot_aggregate", len(entries))
	}
	ba := entries[0].Fields
	if ba.DigestAlg != "sha256" || len(ba.Digest) != 32 {
		return nil, fmt.Errorf("boot_aggregate %s:%x, want a sha256 digest", ba.DigestAlg, ba.Digest)
	}
	if bytes.Equal(ba.Digest, make([]byte, len(ba.Digest))) {
		return nil, errors.New("boot_aggregate is zero: IMA read no PCRs 0-9 from the TPM")
	}
	if got := ima.Replay(entries, crypto.SHA256); !bytes.Equal(got, pcr10) {
		return nil, fmt.Errorf("replay of %d IMA entries %x, guest PCR 10 %x", len(entries), got, pcr10)
	}
	return &IMAFacts{Entries: entries, BootAggregate: ba.Digest, PCR10: pcr10}, nil
}
