// Command tpmmux-verify checks tpmmux evidence for one VM: the quote, the
// replay of the public log, the VM's complete and ordered records, and
// optionally a Keylime runtime policy (with tpmmux's launch section), IMA
// signatures, and keys that must be bound in the VM's log. It exits 0 when
// the evidence is trusted, 1 when it is rejected (the first line on stderr
// says why), and 2 on usage or I/O errors.
//
//	tpmmux-verify --evidence FILE (--nonce HEX | --post-mortem) --identity FILE
//	    (--ak PEMFILE... | --ek-ca CA.pem --enrolled DIR)
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
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
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
	cmd := command()
	if len(args) > 0 {
		if code, ok := cmd.Dispatch(args, "", stdout, stderr); ok {
			return code
		}
	}
	f := newFlags(cmd.FlagSet())
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	v, err := f.prepare(cmd.FlagSet())
	if err != nil {
		return exitFor(err, stderr)
	}
	return v.run(stdout, stderr)
}

// command is tpmmux-verify's command line: its flags, help and man page.
func command() *cli.Command {
	return &cli.Command{
		Name: "tpmmux-verify",
		Synopsis: []string{
			"--evidence FILE (--nonce HEX | --post-mortem) --identity FILE",
			"  (--ak FILE... | --ek-ca FILE --enrolled DIR)",
			"  [--policy FILE] [--launch-policy FILE] [--ima-keys FILE]... [--bind-key FILE]...",
			"  [--expect-uuid UUID] [--checkpoint FILE] [--save-checkpoint FILE] [--json]",
		},
		Summary:    "check tpmmux evidence for one VM",
		ManSection: 1,
		Description: `Checks the quote and its clockInfo, replays the public log to the quoted PCR, counts the VM's
records from its tags, checks every record's commitment, order, genesis and teardown rules, and
optionally appraises the measurements against a Keylime runtime policy (with tpmmux's launch
section), verifies IMA signatures, and requires keys bound in the VM's log. A VM that moved by live
migration has one segment of history per stay on a host: each is verified against its host's AK
(give every host's: --ak repeated, or --ek-ca with --enrolled holding every host's enrolled AK),
the segments must chain (docs/protocol.md "Migration"), and the verdict covers the VM's whole life.
A pure library (internal/verify): no TPM, store or network.`,
		Subs: []cli.Sub{{Name: "enroll", Summary: "enroll a host's AK by credential activation (challenge, finish, list)", Main: enrollMain}},
		Sections: []cli.Section{
			{Title: "Exit status", Body: `0 trusted; 1 rejected (the first stderr line says why); 2 usage or I/O error.`},
			{Title: "See also", Body: `tpmmux-bridge(8), tpmmux-agent(1)`},
		},
	}
}

// flags are tpmmux-verify's flags.
type flags struct {
	evPath, nonceHex, identPath, ekCA, enrolled     *string
	policyPath, launchPath, expectUUID, cpIn, cpOut *string
	akPaths, imaKeys, bindKeys                      multi
	postMortem, allowResettable, asJSON             *bool
	pcr                                             *int
}

func newFlags(fs *flag.FlagSet) *flags {
	f := &flags{}
	f.evPath = fs.String("evidence", "", "evidence `FILE` (JSON or binary CBOR)")
	f.nonceHex = fs.String("nonce", "", "the nonce you sent, `HEX`")
	f.identPath = fs.String("identity", "", "the VM's identity.json `FILE` (uuid, instance, key)")
	fs.Var(&f.akPaths, "ak", "PEM `FILE` of a trusted attestation key (a pinned AK); repeat it for each host a migrated VM ran on")
	f.ekCA = fs.String("ek-ca", "", "PEM `FILE` of the EK CA certificates trusted for enrolled AKs (with --enrolled)")
	f.enrolled = fs.String("enrolled", "", "`DIR` of AKs enrolled with tpmmux-verify enroll (with --ek-ca)")
	f.policyPath = fs.String("policy", "", "Keylime runtime policy JSON `FILE` (optionally with a tpmmux launch section)")
	f.launchPath = fs.String("launch-policy", "", "launch policy JSON `FILE` (the tpmmux section, or its launch object) pinning the launch measurement")
	fs.Var(&f.imaKeys, "ima-keys", "X.509 certificates or public keys `FILE` (PEM or DER) that verify IMA signatures (repeatable)")
	fs.Var(&f.bindKeys, "bind-key", "PEM `FILE`: a public key, certificate or private key that must be bound in the VM's log, e.g. the VM's TLS key (repeatable)")
	f.postMortem = fs.Bool("post-mortem", false, "accept the bridge's final quote of an ended VM instead of a fresh quote")
	f.pcr = fs.Int("pcr", conceal.DefaultPCR, "the multiplexer `PCR` this host uses")
	f.expectUUID = fs.String("expect-uuid", "", "the `UUID` of the VM you mean to attest, known to you independently of the host (e.g. from creating it); another VM's evidence and identity are then rejected")
	f.allowResettable = fs.Bool("insecure-allow-resettable-pcr", false, "accept evidence anchored in PCR 16-23, which can be reset without a reboot (tests only)")
	f.asJSON = fs.Bool("json", false, "print the JSON report on stdout")
	f.cpIn = fs.String("checkpoint", "", "checkpoint `FILE` of an earlier verification of this VM: a high-water mark (less history is a rollback); delta evidence must be the delta after it")
	f.cpOut = fs.String("save-checkpoint", "", "write the checkpoint of this verification to `FILE` (mode 0600) when trusted")
	return f
}

// usageError is an input or usage error: exit 2, "usage error: …".
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &usageError{msg: fmt.Sprintf(format, a...)} }

// rejectedError is a verdict reached before verification (an AK that is
// not enrolled): exit 1, "rejected: …".
type rejectedError struct{ err error }

func (e *rejectedError) Error() string { return e.err.Error() }

// exitFor prints err as its kind says and returns the exit code.
func exitFor(err error, stderr io.Writer) int {
	var rj *rejectedError
	if errors.As(err, &rj) {
		fmt.Fprintf(stderr, "rejected: %v\n", rj.err)
		return exitRejected
	}
	fmt.Fprintf(stderr, "usage error: %v\n", err)
	return exitUsage
}

// verification is one run: the evidence, the options, the trust report
// and the appraiser, and where the report goes.
type verification struct {
	f     *flags
	ev    *evidence.Evidence
	opts  verify.Options
	trust *verify.TrustReport
	appr  *policy.Appraisal
}

// prepare checks the flags and reads every input.
func (f *flags) prepare(fs *flag.FlagSet) (*verification, error) {
	if err := f.check(fs); err != nil {
		return nil, err
	}
	v := &verification{f: f, opts: verify.Options{PostMortem: *f.postMortem, PCR: *f.pcr, AllowResettablePCR: *f.allowResettable}}
	for _, step := range []func() error{v.readChallenge, v.readEvidence, v.readTrustRoot, v.readPolicies, v.readVerifierState} {
		if err := step(); err != nil {
			return nil, err
		}
	}
	return v, nil
}

// check refuses flag combinations that cannot work.
func (f *flags) check(fs *flag.FlagSet) error {
	switch {
	case fs.NArg() > 0:
		return usagef("unexpected argument %q", fs.Arg(0))
	case *f.evPath == "" || *f.identPath == "":
		return usagef("--evidence and --identity are required")
	case len(f.akPaths) > 0 && (*f.ekCA != "" || *f.enrolled != ""):
		return usagef("--ak pins an AK; --ek-ca with --enrolled uses an enrolled one: give one or the other")
	case len(f.akPaths) == 0 && (*f.ekCA == "" || *f.enrolled == ""):
		return usagef("--ak, or --ek-ca with --enrolled, is required")
	case *f.nonceHex == "" && !*f.postMortem:
		return usagef("--nonce is required (or --post-mortem for an ended VM's final quote)")
	case len(f.imaKeys) > 0 && *f.policyPath == "":
		return usagef("--ima-keys needs --policy")
	}
	return nil
}

// readChallenge reads what the verifier knows on its own: its nonce and
// the VM it means to attest.
func (v *verification) readChallenge() error {
	f := v.f
	if *f.nonceHex != "" {
		n, err := hex.DecodeString(strings.TrimSpace(*f.nonceHex))
		if err != nil || len(n) == 0 {
			return usagef("--nonce %q is not hex", *f.nonceHex)
		}
		if len(n) < verify.MinNonce {
			return usagef("--nonce is %d bytes; use at least %d random bytes (e.g. openssl rand -hex 32)", len(n), verify.MinNonce)
		}
		v.opts.Nonce = n
	}
	if *f.expectUUID != "" {
		u, err := conceal.ParseUUID(*f.expectUUID)
		if err != nil {
			return usagef("--expect-uuid %q: %v", *f.expectUUID, err)
		}
		v.opts.ExpectUUID = u
	}
	return nil
}

// readEvidence reads the evidence and the VM's identity.
func (v *verification) readEvidence() error {
	f := v.f
	raw, err := os.ReadFile(*f.evPath)
	if err != nil {
		return usagef("--evidence: %v", err)
	}
	if v.ev, err = evidence.Decode(raw); err != nil {
		// Undecodable input is an input error (exit 2), not a verdict:
		// nothing was verified.
		return usagef("--evidence %s: %v (want tpmmux evidence as written by tpmmux-bridge evidence or tpmmux-agent attest: evidence.json, or the binary CBOR evidence.cbor)", *f.evPath, err)
	}
	if v.ev.Kind == evidence.KindFinal && !*f.postMortem {
		return usagef("--evidence %s is post-mortem evidence (the bridge's final quote of an ended VM): its quote holds no nonce; verify it with --post-mortem instead of --nonce", *f.evPath)
	}
	identRaw, err := os.ReadFile(*f.identPath)
	if err != nil {
		return usagef("--identity: %v", err)
	}
	var ident conceal.Identity
	if err := json.Unmarshal(identRaw, &ident); err != nil {
		return usagef("identity %s: %v", *f.identPath, err)
	}
	v.opts.Identity = &ident
	return nil
}

// readTrustRoot reads the trust root: pinned AKs, or the AKs enrolled
// under the EK CA, one per segment of the VM's history (each segment's
// enrolled AK; the report's trust is the current segment's).
func (v *verification) readTrustRoot() error {
	f := v.f
	if len(f.akPaths) > 0 {
		for _, p := range f.akPaths {
			ak, err := readAK(p)
			if err != nil {
				return usagef("ak %s: %v", p, err)
			}
			v.opts.AKs = append(v.opts.AKs, ak)
		}
		fp, _ := enroll.AKFingerprint(v.opts.AKs[0])
		v.trust = &verify.TrustReport{AK: "pinned", AKSHA256: fp}
		if len(v.opts.AKs) > 1 {
			v.trust.AKSHA256 = ""
			for _, ak := range v.opts.AKs {
				fp, _ := enroll.AKFingerprint(ak)
				v.trust.AKs = append(v.trust.AKs, fp)
			}
		}
		return nil
	}
	caPEM, err := os.ReadFile(*f.ekCA)
	if err != nil {
		return usagef("--ek-ca: %v", err)
	}
	roots, _, err := enroll.ParseCAs(caPEM)
	if err != nil {
		return usagef("ek-ca %s: %v", *f.ekCA, err)
	}
	segs := v.ev.Segments()
	for i, seg := range segs {
		rec, ak, err := v.enrolledAK(seg, roots, len(segs) > 1)
		if err != nil {
			if len(segs) > 1 {
				if re, ok := err.(*rejectedError); ok {
					re.err = fmt.Errorf("segment %d (host %q): %w", i, seg.Host, re.err)
				}
			}
			return err
		}
		for _, k := range ak {
			v.opts.AKs = append(v.opts.AKs, k)
			fp, _ := enroll.AKFingerprint(k)
			if len(segs) > 1 {
				v.trustAK(fp)
			}
		}
		if i == len(segs)-1 {
			fp, _ := enroll.AKFingerprint(ak[0])
			aks := []string(nil)
			if v.trust != nil {
				aks = v.trust.AKs
			}
			v.trust = &verify.TrustReport{AK: "enrolled", AKSHA256: fp, AKs: aks}
			if rec != nil {
				v.trust.EKCertSHA256, v.trust.EKIssuer, v.trust.Host, v.trust.Enrolled = hex.EncodeToString(rec.EKCertSHA256), rec.EKIssuer, rec.Host, rec.Enrolled
			}
		}
	}
	return nil
}

// trustAK notes fp among the trusted AKs of a chain's verification.
func (v *verification) trustAK(fp string) {
	if v.trust == nil {
		v.trust = &verify.TrustReport{}
	}
	if !slices.Contains(v.trust.AKs, fp) {
		v.trust.AKs = append(v.trust.AKs, fp)
	}
}

// enrolledAK looks up the enrolled AK of one segment of the evidence. Its
// AK field is informational: it only selects which enrolled AK to verify
// with. When it names none, a single segment takes the only enrolled AK
// and a chain every enrolled one (the verifier then finds the signer).
func (v *verification) enrolledAK(seg *evidence.Evidence, roots *x509.CertPool, chain bool) (*enroll.Record, []*ecdsa.PublicKey, error) {
	f := v.f
	var named *ecdsa.PublicKey
	if len(seg.AK) > 0 {
		if k, err := x509.ParsePKIXPublicKey(seg.AK); err == nil {
			named, _ = k.(*ecdsa.PublicKey)
		}
	}
	if named == nil && chain {
		all, err := enroll.List(*f.enrolled)
		if err != nil {
			return nil, nil, usagef("enrolled %s: %v", *f.enrolled, err)
		}
		var keys []*ecdsa.PublicKey
		for _, r := range all {
			if k, err := r.Check(roots, time.Now()); err == nil {
				keys = append(keys, k)
			}
		}
		if len(keys) == 0 {
			return nil, nil, &rejectedError{err: &enroll.NotEnrolledError{Dir: *f.enrolled}}
		}
		return nil, keys, nil
	}
	rec, ak, err := enroll.Lookup(*f.enrolled, named, roots, time.Now())
	var ne *enroll.NotEnrolledError
	switch {
	case errors.As(err, &ne) || enroll.IsRejection(err):
		return nil, nil, &rejectedError{err: err}
	case err != nil:
		return nil, nil, usagef("enrolled %s: %v", *f.enrolled, err)
	}
	return rec, []*ecdsa.PublicKey{ak}, nil
}

// readPolicies builds step 5's appraiser (runtime policy, IMA keys, launch
// policy) and the keys that must be bound.
func (v *verification) readPolicies() error {
	f := v.f
	if *f.policyPath != "" {
		pb, err := os.ReadFile(*f.policyPath)
		if err != nil {
			return usagef("--policy: %v", err)
		}
		rt, err := policy.Parse(pb)
		if err != nil {
			return usagef("policy %s: %v", *f.policyPath, err)
		}
		var keys []policy.Key
		for _, p := range f.imaKeys {
			ks, err := policy.ReadKeyFile(p)
			if err != nil {
				return usagef("ima-keys: %v", err)
			}
			keys = append(keys, ks...)
		}
		v.appr = policy.New(rt, keys)
	}
	if *f.launchPath != "" {
		lb, err := os.ReadFile(*f.launchPath)
		if err != nil {
			return usagef("--launch-policy: %v", err)
		}
		ext, err := policy.ParseLaunch(lb)
		if err != nil {
			return usagef("launch-policy %s: %v", *f.launchPath, err)
		}
		if v.appr == nil {
			v.appr = policy.New(nil, nil)
		}
		v.appr.WithLaunch(ext.Launch)
	}
	if v.appr != nil {
		v.opts.Appraiser = v.appr
	}
	for _, p := range f.bindKeys {
		b, err := os.ReadFile(p)
		if err != nil {
			return usagef("--bind-key: %v", err)
		}
		h, err := verify.KeyHashPEM(b)
		if err != nil {
			return usagef("bind-key %s: %v", p, err)
		}
		v.opts.BindKeys = append(v.opts.BindKeys, h)
	}
	return nil
}

// readVerifierState reads the checkpoint an earlier verification left.
func (v *verification) readVerifierState() error {
	f := v.f
	if *f.cpIn == "" {
		return nil
	}
	b, err := os.ReadFile(*f.cpIn)
	if err != nil {
		return usagef("--checkpoint: %v", err)
	}
	var cp verify.Checkpoint
	if err := json.Unmarshal(b, &cp); err != nil {
		return usagef("checkpoint %s: %v", *f.cpIn, err)
	}
	v.opts.Checkpoint = &cp
	return nil
}

// run verifies and reports: the JSON report with --json, the verdict on
// stderr when rejected, a summary on stdout when trusted, and the new
// checkpoint with --save-checkpoint.
func (v *verification) run(stdout, stderr io.Writer) int {
	f := v.f
	rep, verr := verify.Verify(v.ev, v.opts)
	rep.Trust = v.trust
	if v.appr != nil {
		rep.Appraisal = v.appr.Report()
	}
	if *f.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			fmt.Fprintf(stderr, "write report: %v\n", err)
			return exitUsage
		}
	}
	if verr != nil {
		if !verify.IsRejection(verr) {
			return exitFor(verr, stderr)
		}
		fmt.Fprintf(stderr, "rejected: %v\n", verr)
		if !*f.asJSON {
			for i, x := range rep.Violations {
				if i == 20 {
					fmt.Fprintf(stderr, "  … and %d more (--json lists all)\n", len(rep.Violations)-20)
					break
				}
				fmt.Fprintf(stderr, "  violation: record %d %s %s: %s\n", x.Seq, x.Path, x.Digest, x.Reason)
			}
		}
		return exitRejected
	}
	if *f.cpOut != "" {
		b, err := json.MarshalIndent(rep.Checkpoint, "", " ")
		if err == nil {
			err = os.WriteFile(*f.cpOut, append(b, '\n'), 0o600)
		}
		if err != nil {
			fmt.Fprintf(stderr, "write checkpoint: %v\n", err)
			return exitUsage
		}
	}
	if !*f.asJSON {
		printTrusted(stdout, rep)
	}
	return exitTrusted
}

// printTrusted is the summary of a trusted report.
func printTrusted(stdout io.Writer, rep *verify.Report) {
	fmt.Fprintf(stdout, "trusted: vm %s (%s) instance %s: %d records (%d measurements) in a log of %d entries, epoch %.16s (TPM resetCount %d); AK %s\n",
		rep.VM.Name, rep.VM.UUID, rep.VM.Instance, rep.Records, rep.Counts.Measurements, rep.LogEntries, rep.Epoch.SHA256, rep.Epoch.ResetCount, rep.Trust.AK)
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
	if len(rep.Segments) > 1 || rep.MigratedTo != "" {
		for _, sg := range rep.Segments {
			end := sg.End
			switch {
			case end == "migrated-out":
				end += " to " + sg.DestHost
			case end == "":
				end = "live"
			}
			fmt.Fprintf(stdout, "  segment %d: host %s, AK %.16s, records %d-%d, %s .. %s\n", sg.Index, sg.Host, sg.AK, sg.First, sg.Last, sg.Start, end)
		}
	}
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
