// Command tpmmux-verify checks tpmmux evidence for one VM: the quote, the
// replay of the public log, the VM's complete and ordered records, and
// optionally a Keylime runtime policy. It exits 0 when the evidence is
// trusted, 1 when it is rejected (the first line on stderr says why), and
// 2 on usage or I/O errors.
//
//	tpmmux-verify --evidence FILE --nonce HEX --identity FILE --ak PEMFILE [--policy FILE] [--json]
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
	"strings"

	"github.com/tpmmux/tpmmux/internal/conceal"
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

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tpmmux-verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	evPath := fs.String("evidence", "", "evidence file (JSON or binary CBOR)")
	nonceHex := fs.String("nonce", "", "the nonce you sent, hex")
	identPath := fs.String("identity", "", "the VM's identity.json (uuid, instance, key)")
	akPath := fs.String("ak", "", "PEM file of the trusted attestation key")
	policyPath := fs.String("policy", "", "Keylime runtime policy JSON to appraise measurements against")
	postMortem := fs.Bool("post-mortem", false, "accept the bridge's final quote of an ended VM instead of a fresh quote")
	pcr := fs.Int("pcr", 23, "the multiplexer PCR this host uses")
	asJSON := fs.Bool("json", false, "print the JSON report on stdout")
	cpIn := fs.String("checkpoint", "", "checkpoint of an earlier verification: the evidence is the delta after it")
	cpOut := fs.String("save-checkpoint", "", "write the checkpoint of this verification here (mode 0600) when trusted")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: tpmmux-verify --evidence FILE (--nonce HEX | --post-mortem) --identity FILE --ak PEMFILE [--policy FILE] [--checkpoint FILE] [--save-checkpoint FILE] [--json]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "usage error: "+format+"\n", a...)
		return exitUsage
	}
	if fs.NArg() > 0 {
		return usage("unexpected argument %q", fs.Arg(0))
	}
	if *evPath == "" || *identPath == "" || *akPath == "" {
		return usage("--evidence, --identity and --ak are required")
	}
	if *nonceHex == "" && !*postMortem {
		return usage("--nonce is required (or --post-mortem for an ended VM's final quote)")
	}
	opts := verify.Options{PostMortem: *postMortem, PCR: *pcr}
	if *nonceHex != "" {
		n, err := hex.DecodeString(strings.TrimSpace(*nonceHex))
		if err != nil || len(n) == 0 {
			return usage("--nonce %q is not hex", *nonceHex)
		}
		opts.Nonce = n
	}
	raw, err := os.ReadFile(*evPath)
	if err != nil {
		return usage("%v", err)
	}
	ev, err := evidence.Decode(raw)
	if err != nil {
		// Undecodable evidence is a rejection, not a usage error: the
		// verifier was used correctly, and what it was given is bad.
		fmt.Fprintf(stderr, "rejected: %v\n", err)
		return exitRejected
	}
	identRaw, err := os.ReadFile(*identPath)
	if err != nil {
		return usage("%v", err)
	}
	var ident conceal.Identity
	if err := json.Unmarshal(identRaw, &ident); err != nil {
		return usage("identity %s: %v", *identPath, err)
	}
	opts.Identity = &ident
	ak, err := readAK(*akPath)
	if err != nil {
		return usage("ak %s: %v", *akPath, err)
	}
	opts.AK = ak
	if *policyPath != "" {
		pb, err := os.ReadFile(*policyPath)
		if err != nil {
			return usage("%v", err)
		}
		pol, err := policy.Parse(pb)
		if err != nil {
			return usage("policy %s: %v", *policyPath, err)
		}
		opts.Appraise = pol.Appraise
	}
	if *cpIn != "" {
		b, err := os.ReadFile(*cpIn)
		if err != nil {
			return usage("%v", err)
		}
		var cp verify.Checkpoint
		if err := json.Unmarshal(b, &cp); err != nil {
			return usage("checkpoint %s: %v", *cpIn, err)
		}
		opts.Checkpoint = &cp
	}
	rep, verr := verify.Verify(ev, opts)
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
		fmt.Fprintf(stdout, "trusted: vm %s (%s) instance %s: %d records (%d measurements) in a log of %d entries, epoch %d\n",
			rep.VM.Name, rep.VM.UUID, rep.VM.Instance, rep.Records, rep.Counts.Measurements, rep.LogEntries, rep.Epoch.Number)
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
