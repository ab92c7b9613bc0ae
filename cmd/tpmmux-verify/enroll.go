package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/enroll"
)

// enrollExit is the exit status text of the enroll steps.
const enrollExit = `0 done; 1 refused (the first stderr line says why); 2 usage or I/O error.`

// enrollMain is `tpmmux-verify enroll …`: AK enrollment by credential
// activation, the verifier's two steps.
func enrollMain(args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-verify enroll",
		Synopsis: []string{"(challenge | finish | list) [flags]"},
		Summary:  "enroll a host's AK by credential activation",
		Description: `The host side: tpmmux-bridge enroll-request --out req.json, and
tpmmux-bridge enroll-answer --challenge chal.json --out ans.json.`,
		Subs: []cli.Sub{
			{Name: "challenge", Summary: "challenge a host's enrollment request", Main: enrollChallenge},
			{Name: "finish", Summary: "check the host's answer and enroll its AK", Main: enrollFinish},
			{Name: "list", Summary: "list the enrolled AKs", Main: enrollList},
		},
		Sections: []cli.Section{{Title: "Exit status", Body: enrollExit}},
	}
	if code, ok := cmd.Dispatch(args, "", stdout, stderr); ok {
		return code
	}
	return cmd.UnknownSub(stderr, args[0])
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
	cmd := &cli.Command{
		Name:     "tpmmux-verify enroll challenge",
		Synopsis: []string{"--request FILE --ek-ca FILE --out FILE --state FILE [--ttl DURATION]"},
		Summary:  "challenge a host's enrollment request",
		Description: `Checks the host's EK certificate against the EK CAs you trust, and makes a challenge only the
TPM holding that EK and the claimed AK can answer. Keep the state file; send the challenge.`,
		Sections: []cli.Section{{Title: "Exit status", Body: enrollExit}},
	}
	fs := cmd.FlagSet()
	reqPath := fs.String("request", "", "the host's enrollment request `FILE` (tpmmux-bridge enroll-request)")
	caPath := fs.String("ek-ca", "", "PEM `FILE` of the EK CA certificates you trust (the TPM vendors' roots)")
	out := fs.String("out", "", "write the challenge for the host to `FILE`")
	statePath := fs.String("state", "", "write the secret state to `FILE` (mode 0600; keep it, never send it)")
	ttl := fs.Duration("ttl", enroll.DefaultTTL, "how long the host has to answer")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
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
	cmd := &cli.Command{
		Name:     "tpmmux-verify enroll finish",
		Synopsis: []string{"--answer FILE --state FILE (--enrolled DIR | --out FILE)"},
		Summary:  "check the host's answer and enroll its AK",
		Sections: []cli.Section{{Title: "Exit status", Body: enrollExit}},
	}
	fs := cmd.FlagSet()
	ansPath := fs.String("answer", "", "the host's answer `FILE` (tpmmux-bridge enroll-answer)")
	statePath := fs.String("state", "", "the state `FILE` enroll challenge wrote")
	dir := fs.String("enrolled", "", "add the enrolled AK to this `DIR` (for --ek-ca FILE --enrolled DIR)")
	out := fs.String("out", "", "write the enrolled AK's PEM to `FILE` (for --ak)")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
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
	cmd := &cli.Command{
		Name:     "tpmmux-verify enroll list",
		Synopsis: []string{"--enrolled DIR [--ek-ca FILE]"},
		Summary:  "list the enrolled AKs",
		Sections: []cli.Section{{Title: "Exit status", Body: enrollExit}},
	}
	fs := cmd.FlagSet()
	dir := fs.String("enrolled", "", "the `DIR` of enrolled AKs")
	caPath := fs.String("ek-ca", "", "also check each against the EK CA certificates in `FILE`")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
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
