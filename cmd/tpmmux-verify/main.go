// Command tpmmux-verify checks tpmmux evidence for one VM: the quote, the
// replay of the public log, the VM's complete and ordered records, and
// optionally a Keylime runtime policy (with tpmmux's launch section), IMA
// signatures, and keys that must be bound in the VM's log. It exits 0 when
// the evidence is trusted, 1 when it is rejected (the first line on stderr
// says why), and 2 on usage or I/O errors.
//
//	tpmmux-verify --evidence FILE (--nonce HEX | --post-mortem) --identity FILE
//	    (--ak PEMFILE | --ek-ca CA.pem --enrolled DIR)
//	    [--policy FILE] [--launch-policy FILE] [--ima-keys FILE]... [--bind-key PEM]... [--json]
//
// It also enrolls a host's AK by credential activation (enroll.go):
//
//	tpmmux-verify enroll challenge --request req.json --ek-ca CA.pem --out chal.json --state state.json
//	tpmmux-verify enroll finish --answer ans.json --state state.json (--enrolled DIR | --out ak.pem)
package main

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/enroll"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/policy"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// Exit codes of the verifier contract.
const (
	exitTrusted  = 0
	exitRejected = 1
	exitUsage    = 2
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// multi is a flag that may be given several times.
type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func run(args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name: "tpmmux-verify",
		Synopsis: []string{
			"--evidence FILE (--nonce HEX | --post-mortem) --identity FILE",
			"  (--ak FILE | --ek-ca FILE --enrolled DIR)",
			"  [--policy FILE] [--launch-policy FILE] [--ima-keys FILE]... [--bind-key FILE]...",
			"  [--expect-uuid UUID] [--checkpoint FILE] [--save-checkpoint FILE] [--json]",
		},
		Summary:    "check tpmmux evidence for one VM",
		ManSection: 1,
		Description: `Checks the quote and its clockInfo, replays the public log to the quoted PCR, counts the VM's
records from its tags, checks every record's commitment, order, genesis and teardown rules, and
optionally appraises the measurements against a Keylime runtime policy (with tpmmux's launch
section), verifies IMA signatures, and requires keys bound in the VM's log. A pure library
(internal/verify): no TPM, store or network.`,
		Subs: []cli.Sub{{Name: "enroll", Summary: "enroll a host's AK by credential activation (challenge, finish, list)", Main: enrollMain}},
		Sections: []cli.Section{
			{Title: "Exit status", Body: `0 trusted; 1 rejected (the first stderr line says why); 2 usage or I/O error.`},
			{Title: "See also", Body: `tpmmux-bridge(8), tpmmux-agent(1)`},
		},
	}
	if len(args) > 0 {
		if code, ok := cmd.Dispatch(args, "", stdout, stderr); ok {
			return code
		}
	}
	fs := cmd.FlagSet()
	evPath := fs.String("evidence", "", "evidence `FILE` (JSON or binary CBOR)")
	nonceHex := fs.String("nonce", "", "the nonce you sent, `HEX`")
	identPath := fs.String("identity", "", "the VM's identity.json `FILE` (uuid, instance, key)")
	akPath := fs.String("ak", "", "PEM `FILE` of the trusted attestation key (a pinned AK)")
	ekCA := fs.String("ek-ca", "", "PEM `FILE` of the EK CA certificates trusted for enrolled AKs (with --enrolled)")
	enrolled := fs.String("enrolled", "", "`DIR` of AKs enrolled with tpmmux-verify enroll (with --ek-ca)")
	policyPath := fs.String("policy", "", "Keylime runtime policy JSON `FILE` (optionally with a tpmmux launch section)")
	launchPath := fs.String("launch-policy", "", "launch policy JSON `FILE` (the tpmmux section, or its launch object) pinning the launch measurement")
	var imaKeys, bindKeys multi
	fs.Var(&imaKeys, "ima-keys", "X.509 certificates or public keys `FILE` (PEM or DER) that verify IMA signatures (repeatable)")
	fs.Var(&bindKeys, "bind-key", "PEM `FILE`: a public key, certificate or private key that must be bound in the VM's log, e.g. the VM's TLS key (repeatable)")
	postMortem := fs.Bool("post-mortem", false, "accept the bridge's final quote of an ended VM instead of a fresh quote")
	pcr := fs.Int("pcr", conceal.DefaultPCR, "the multiplexer `PCR` this host uses")
	expectUUID := fs.String("expect-uuid", "", "the `UUID` of the VM you mean to attest, known to you independently of the host (e.g. from creating it); another VM's evidence and identity are then rejected")
	allowResettable := fs.Bool("insecure-allow-resettable-pcr", false, "accept evidence anchored in PCR 16-23, which can be reset without a reboot (tests only)")
	asJSON := fs.Bool("json", false, "print the JSON report on stdout")
	cpIn := fs.String("checkpoint", "", "checkpoint `FILE` of an earlier verification of this VM: a high-water mark (less history is a rollback); delta evidence must be the delta after it")
	cpOut := fs.String("save-checkpoint", "", "write the checkpoint of this verification to `FILE` (mode 0600) when trusted")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "usage error: "+format+"\n", a...)
		return exitUsage
	}
	if fs.NArg() > 0 {
		return usage("unexpected argument %q", fs.Arg(0))
	}
	if *evPath == "" || *identPath == "" {
		return usage("--evidence and --identity are required")
	}
	switch {
	case *akPath != "" && (*ekCA != "" || *enrolled != ""):
		return usage("--ak pins an AK; --ek-ca with --enrolled uses an enrolled one: give one or the other")
	case *akPath == "" && (*ekCA == "" || *enrolled == ""):
		return usage("--ak, or --ek-ca with --enrolled, is required")
	}
	if *nonceHex == "" && !*postMortem {
		return usage("--nonce is required (or --post-mortem for an ended VM's final quote)")
	}
	if len(imaKeys) > 0 && *policyPath == "" {
		return usage("--ima-keys needs --policy")
	}
	opts := verify.Options{PostMortem: *postMortem, PCR: *pcr, AllowResettablePCR: *allowResettable}
	if *nonceHex != "" {
		n, err := hex.DecodeString(strings.TrimSpace(*nonceHex))
		if err != nil || len(n) == 0 {
			return usage("--nonce %q is not hex", *nonceHex)
		}
		if len(n) < verify.MinNonce {
			return usage("--nonce is %d bytes; use at least %d random bytes (e.g. openssl rand -hex 32)", len(n), verify.MinNonce)
		}
		opts.Nonce = n
	}
	if *expectUUID != "" {
		u, err := conceal.ParseUUID(*expectUUID)
		if err != nil {
			return usage("--expect-uuid %q: %v", *expectUUID, err)
		}
		opts.ExpectUUID = u
	}
	raw, err := os.ReadFile(*evPath)
	if err != nil {
		return usage("--evidence: %v", err)
	}
	ev, err := evidence.Decode(raw)
	if err != nil {
		// Undecodable input is an input error (exit 2), not a verdict:
		// nothing was verified.
		return usage("--evidence %s: %v (want tpmmux evidence as written by tpmmux-bridge evidence or tpmmux-agent attest: evidence.json, or the binary CBOR evidence.cbor)", *evPath, err)
	}
	if ev.Kind == evidence.KindFinal && !*postMortem {
		return usage("--evidence %s is post-mortem evidence (the bridge's final quote of an ended VM): its quote holds no nonce; verify it with --post-mortem instead of --nonce", *evPath)
	}
	identRaw, err := os.ReadFile(*identPath)
	if err != nil {
		return usage("--identity: %v", err)
	}
	var ident conceal.Identity
	if err := json.Unmarshal(identRaw, &ident); err != nil {
		return usage("identity %s: %v", *identPath, err)
	}
	opts.Identity = &ident

	// The trust root: a pinned AK, or the AK enrolled under the EK CA.
	var trust *verify.TrustReport
	if *akPath != "" {
		ak, err := readAK(*akPath)
		if err != nil {
			return usage("ak %s: %v", *akPath, err)
		}
		opts.AK = ak
		fp, _ := enroll.AKFingerprint(ak)
		trust = &verify.TrustReport{AK: "pinned", AKSHA256: fp}
	} else {
		caPEM, err := os.ReadFile(*ekCA)
		if err != nil {
			return usage("--ek-ca: %v", err)
		}
		roots, _, err := enroll.ParseCAs(caPEM)
		if err != nil {
			return usage("ek-ca %s: %v", *ekCA, err)
		}
		// The evidence's AK field is informational: it only selects which
		// enrolled AK to verify with.
		var named *ecdsa.PublicKey
		if len(ev.AK) > 0 {
			if k, err := x509.ParsePKIXPublicKey(ev.AK); err == nil {
				named, _ = k.(*ecdsa.PublicKey)
			}
		}
		rec, ak, err := enroll.Lookup(*enrolled, named, roots, time.Now())
		var ne *enroll.NotEnrolledError
		switch {
		case errors.As(err, &ne) || enroll.IsRejection(err):
			fmt.Fprintf(stderr, "rejected: %v\n", err)
			return exitRejected
		case err != nil:
			return usage("enrolled %s: %v", *enrolled, err)
		}
		opts.AK = ak
		fp, _ := enroll.AKFingerprint(ak)
		trust = &verify.TrustReport{AK: "enrolled", AKSHA256: fp, EKCertSHA256: hex.EncodeToString(rec.EKCertSHA256),
			EKIssuer: rec.EKIssuer, Host: rec.Host, Enrolled: rec.Enrolled}
	}

	// Step 5: the appraiser (runtime policy, IMA keys, launch policy).
	var appr *policy.Appraisal
	if *policyPath != "" {
		pb, err := os.ReadFile(*policyPath)
		if err != nil {
			return usage("--policy: %v", err)
		}
		rt, err := policy.Parse(pb)
		if err != nil {
			return usage("policy %s: %v", *policyPath, err)
		}
		var keys []policy.Key
		for _, p := range imaKeys {
			ks, err := policy.ReadKeyFile(p)
			if err != nil {
				return usage("ima-keys: %v", err)
			}
			keys = append(keys, ks...)
		}
		appr = policy.New(rt, keys)
	}
	if *launchPath != "" {
		lb, err := os.ReadFile(*launchPath)
		if err != nil {
			return usage("--launch-policy: %v", err)
		}
		ext, err := policy.ParseLaunch(lb)
		if err != nil {
			return usage("launch-policy %s: %v", *launchPath, err)
		}
		if appr == nil {
			appr = policy.New(nil, nil)
		}
		appr.WithLaunch(ext.Launch)
	}
	if appr != nil {
		opts.Appraiser = appr
	}
	for _, p := range bindKeys {
		b, err := os.ReadFile(p)
		if err != nil {
			return usage("--bind-key: %v", err)
		}
		h, err := verify.KeyHashPEM(b)
		if err != nil {
			return usage("bind-key %s: %v", p, err)
		}
		opts.BindKeys = append(opts.BindKeys, h)
	}
	if *cpIn != "" {
		b, err := os.ReadFile(*cpIn)
		if err != nil {
			return usage("--checkpoint: %v", err)
		}
		var cp verify.Checkpoint
		if err := json.Unmarshal(b, &cp); err != nil {
			return usage("checkpoint %s: %v", *cpIn, err)
		}
		opts.Checkpoint = &cp
	}
	rep, verr := verify.Verify(ev, opts)
	rep.Trust = trust
	if appr != nil {
		rep.Appraisal = appr.Report()
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			fmt.Fprintf(stderr, "write report: %v\n", err)
			return exitUsage
		}
	}
	if verr != nil {
		if verify.IsRejection(verr) {
			fmt.Fprintf(stderr, "rejected: %v\n", verr)
			if !*asJSON {
				for i, v := range rep.Violations {
					if i == 20 {
						fmt.Fprintf(stderr, "  … and %d more (--json lists all)\n", len(rep.Violations)-20)
						break
					}
					fmt.Fprintf(stderr, "  violation: record %d %s %s: %s\n", v.Seq, v.Path, v.Digest, v.Reason)
				}
			}
			return exitRejected
		}
		return usage("%v", verr)
	}
	if *cpOut != "" {
		b, err := json.MarshalIndent(rep.Checkpoint, "", " ")
		if err == nil {
			err = os.WriteFile(*cpOut, append(b, '\n'), 0o600)
		}
		if err != nil {
			fmt.Fprintf(stderr, "write checkpoint: %v\n", err)
			return exitUsage
		}
	}
	if !*asJSON {
		fmt.Fprintf(stdout, "trusted: vm %s (%s) instance %s: %d records (%d measurements) in a log of %d entries, epoch %.16s (TPM resetCount %d); AK %s\n",
			rep.VM.Name, rep.VM.UUID, rep.VM.Instance, rep.Records, rep.Counts.Measurements, rep.LogEntries, rep.Epoch.SHA256, rep.Epoch.ResetCount, trust.AK)
		if a := rep.Appraisal; a != nil {
			fmt.Fprintf(stdout, "  policy: %d appraised, %d excluded, %d ignored", a.Appraised, a.Excluded, len(a.Ignored))
			if s := a.Signatures; s != nil && s.Signed > 0 {
				fmt.Fprintf(stdout, "; signatures: %d of %d verified", s.Verified, s.Signed)
			}
			if a.Launch != nil {
				fmt.Fprintf(stdout, "; launch: %s pinned", strings.Join(a.Launch.Checked, ", "))
			}
			fmt.Fprintln(stdout)
		}
		for _, b := range rep.BoundKeys {
			fmt.Fprintf(stdout, "  key %s bound (record %d, purpose %s)\n", b.SHA256, b.Seq, b.Purpose)
		}
	}
	return exitTrusted
}

func readAK(path string) (*ecdsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, errors.New("no PEM PUBLIC KEY block")
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, want ECDSA", pub)
	}
	return ec, nil
}
