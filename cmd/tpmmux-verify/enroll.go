package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/tpmmux/tpmmux/internal/enroll"
)

const enrollUsage = `usage:
  tpmmux-verify enroll challenge --request req.json --ek-ca CA.pem --out chal.json --state state.json [--ttl 1h]
  tpmmux-verify enroll finish --answer ans.json --state state.json (--enrolled DIR | --out ak.pem)
  tpmmux-verify enroll list --enrolled DIR [--ek-ca CA.pem]

The host side: tpmmux-bridge enroll-request --out req.json, and
tpmmux-bridge enroll-answer --challenge chal.json --out ans.json.
Exit 0: done; 1: refused (the first stderr line says why); 2: usage or I/O.`

// enrollMain is `tpmmux-verify enroll …`: AK enrollment by credential
// activation, the verifier's two steps.
func enrollMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, enrollUsage)
		return exitUsage
	}
	switch args[0] {
	case "challenge":
		return enrollChallenge(args[1:], stdout, stderr)
	case "finish":
		return enrollFinish(args[1:], stdout, stderr)
	case "list":
		return enrollList(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprintln(stdout, enrollUsage)
		return exitTrusted
	}
	fmt.Fprintf(stderr, "usage error: unknown enroll step %q\n%s\n", args[0], enrollUsage)
	return exitUsage
}

// refusedOr prints a refusal (exit 1) or an error (exit 2).
func refusedOr(stderr io.Writer, err error) int {
	if enroll.IsRejection(err) {
		fmt.Fprintf(stderr, "refused: %v\n", err)
		return exitRejected
	}
	fmt.Fprintf(stderr, "error: %v\n", err)
	return exitUsage
}

func enrollChallenge(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("enroll challenge", flag.ContinueOnError)
	fs.SetOutput(stderr)
	reqPath := fs.String("request", "", "the host's enrollment request (tpmmux-bridge enroll-request)")
	caPath := fs.String("ek-ca", "", "PEM file of the EK CA certificates you trust (the TPM vendors' roots)")
	out := fs.String("out", "", "write the challenge for the host here")
	statePath := fs.String("state", "", "write the secret state here (mode 0600; keep it, never send it)")
	ttl := fs.Duration("ttl", enroll.DefaultTTL, "how long the host has to answer")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *reqPath == "" || *caPath == "" || *out == "" || *statePath == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage error: --request, --ek-ca, --out and --state are required")
		return exitUsage
	}
	var req enroll.Request
	if err := enroll.ReadJSON(*reqPath, &req); err != nil {
		fmt.Fprintf(stderr, "usage error: %v\n", err)
		return exitUsage
	}
	caPEM, err := os.ReadFile(*caPath)
	if err != nil {
		fmt.Fprintf(stderr, "usage error: %v\n", err)
		return exitUsage
	}
	roots, _, err := enroll.ParseCAs(caPEM)
	if err != nil {
		fmt.Fprintf(stderr, "usage error: ek-ca %s: %v\n", *caPath, err)
		return exitUsage
	}
	chal, st, err := enroll.NewChallenge(&req, roots, enroll.Options{TTL: *ttl})
	if err != nil {
		return refusedOr(stderr, err)
	}
	if err := enroll.WriteJSON(*statePath, st, 0o600); err != nil {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return exitUsage
	}
	if err := enroll.WriteJSON(*out, chal, 0o644); err != nil {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return exitUsage
	}
	fmt.Fprintf(stdout, "EK certificate of %s checked (%s EK, issuer %s); challenge for AK %x written to %s (answer by %s);\nthe host answers with\n  tpmmux-bridge enroll-answer --challenge %s --out ans.json\n",
		nonEmpty(req.Host, "the host"), req.EKKind, issuerOf(st.EKCert), chal.AKName, *out, chal.Expires.Format(time.RFC3339), filepath.Base(*out))
	return exitTrusted
}

func enrollFinish(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("enroll finish", flag.ContinueOnError)
	fs.SetOutput(stderr)
	ansPath := fs.String("answer", "", "the host's answer (tpmmux-bridge enroll-answer)")
	statePath := fs.String("state", "", "the state enroll challenge wrote")
	dir := fs.String("enrolled", "", "add the enrolled AK to this directory (for --ek-ca CA.pem --enrolled DIR)")
	out := fs.String("out", "", "write the enrolled AK's PEM here (for --ak)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *ansPath == "" || *statePath == "" || (*dir == "" && *out == "") || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage error: --answer, --state and --enrolled DIR or --out ak.pem are required")
		return exitUsage
	}
	var ans enroll.Answer
	if err := enroll.ReadJSON(*ansPath, &ans); err != nil {
		fmt.Fprintf(stderr, "usage error: %v\n", err)
		return exitUsage
	}
	var st enroll.State
	if err := enroll.ReadJSON(*statePath, &st); err != nil {
		fmt.Fprintf(stderr, "usage error: %v\n", err)
		return exitUsage
	}
	rec, err := enroll.Finish(&st, &ans, time.Now())
	if err != nil {
		return refusedOr(stderr, err)
	}
	if *dir != "" {
		p, err := enroll.Save(*dir, rec)
		if err != nil {
			fmt.Fprintf(stderr, "error: %v\n", err)
			return exitUsage
		}
		fmt.Fprintf(stdout, "enrolled: the AK of %s is in the TPM of the certified EK (%s); stored as %s\n", nonEmpty(rec.Host, "the host"), rec.EKIssuer, p)
	}
	if *out != "" {
		if err := os.WriteFile(*out, []byte(rec.AKPEM), 0o644); err != nil {
			fmt.Fprintf(stderr, "error: %v\n", err)
			return exitUsage
		}
		fmt.Fprintf(stdout, "enrolled AK written to %s\n", *out)
	}
	return exitTrusted
}

func enrollList(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("enroll list", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("enrolled", "", "the directory of enrolled AKs")
	caPath := fs.String("ek-ca", "", "also check each against these EK CA certificates")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *dir == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage error: --enrolled DIR is required")
		return exitUsage
	}
	recs, err := enroll.List(*dir)
	if err != nil {
		fmt.Fprintf(stderr, "error: %v\n", err)
		return exitUsage
	}
	var check func(*enroll.Record) string
	if *caPath != "" {
		caPEM, err := os.ReadFile(*caPath)
		if err != nil {
			fmt.Fprintf(stderr, "usage error: %v\n", err)
			return exitUsage
		}
		roots, _, err := enroll.ParseCAs(caPEM)
		if err != nil {
			fmt.Fprintf(stderr, "usage error: %v\n", err)
			return exitUsage
		}
		check = func(r *enroll.Record) string {
			if _, err := r.Check(roots, time.Now()); err != nil {
				return "REFUSED: " + err.Error()
			}
			return "ok"
		}
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tEK\tENROLLED\tAK SHA256\tEK ISSUER\tCHECK")
	bad := 0
	for _, r := range recs {
		fp := "?"
		if k, _, err := enroll.CheckAK(r.AKPublic); err == nil {
			fp, _ = enroll.AKFingerprint(k)
		}
		c := "-"
		if check != nil {
			if c = check(r); c != "ok" {
				bad++
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%.16s\t%s\t%s\n", nonEmpty(r.Host, "-"), r.EKKind, r.Enrolled.Format(time.RFC3339), fp, r.EKIssuer, c)
	}
	tw.Flush()
	if bad > 0 {
		return exitRejected
	}
	return exitTrusted
}

func nonEmpty(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func issuerOf(certPEM string) string {
	c, _, err := enroll.ParseEKCert([]byte(certPEM))
	if err != nil {
		return "?"
	}
	return c.Issuer.String()
}
