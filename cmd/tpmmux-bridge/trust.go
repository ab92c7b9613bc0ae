package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/enroll"
)

// The host's side of AK enrollment and of enforcement, through the
// daemon's control socket:
//
//	tpmmux-bridge enroll-request --out req.json
//	tpmmux-bridge enroll-answer --challenge chal.json --out ans.json
//	tpmmux-bridge violation --vm NAME --reason TEXT [--detail TEXT | --report REPORT.json]

// enrollRequestMain is `tpmmux-bridge enroll-request --out FILE`.
func enrollRequestMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge enroll-request",
		Synopsis: []string{"--out FILE [--control PATH]"},
		Summary:  "the host's AK enrollment request for a verifier",
		Description: `Writes the TPM's EK (and its certificate) and the AK for a verifier to challenge with
tpmmux-verify enroll challenge.`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, time.Minute)
	out := fs.String("out", "", "write the enrollment request (JSON) to this `FILE`; - for stdout")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *out == "" || fs.NArg() > 0 {
		cmd.UsageError(stderr, "--out is required")
		return cli.ExitUsage
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpEnrollRequest})
	if err != nil {
		return adminErr(stderr, "enroll-request", err)
	}
	if resp.Enrollment == nil {
		return adminErr(stderr, "enroll-request", fmt.Errorf("empty answer"))
	}
	if err := writeJSONFile(*out, stdout, resp.Enrollment); err != nil {
		return adminErr(stderr, "enroll-request", err)
	}
	if *out != "-" {
		fmt.Fprintf(stdout, "enrollment request of %s (%s EK, certificate from NV %s) written to %s; the verifier answers it with\n  tpmmux-verify enroll challenge --request %s --ek-ca CA.pem --out chal.json --state state.json\n",
			resp.Enrollment.Host, resp.Enrollment.EKKind, resp.Enrollment.EKCertIndex, *out, *out)
	}
	return 0
}

// enrollAnswerMain is `tpmmux-bridge enroll-answer --challenge FILE --out FILE`.
func enrollAnswerMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge enroll-answer",
		Synopsis: []string{"--challenge FILE --out FILE [--control PATH]"},
		Summary:  "have the TPM activate a verifier's challenge",
		Description: `The TPM can answer only if the AK sits in the TPM whose EK the vendor certified (credential
activation); the verifier finishes with tpmmux-verify enroll finish.`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, time.Minute)
	chalPath := fs.String("challenge", "", "the verifier's challenge `FILE` (JSON)")
	out := fs.String("out", "", "write the answer (JSON) to this `FILE`; - for stdout")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *chalPath == "" || *out == "" || fs.NArg() > 0 {
		cmd.UsageError(stderr, "--challenge and --out are required")
		return cli.ExitUsage
	}
	var chal enroll.Challenge
	if err := enroll.ReadJSON(*chalPath, &chal); err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge enroll-answer: %v\n", err)
		return 2
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpEnrollAnswer, Challenge: &chal})
	if err != nil {
		return adminErr(stderr, "enroll-answer", err)
	}
	if resp.Answer == nil {
		return adminErr(stderr, "enroll-answer", fmt.Errorf("empty answer"))
	}
	if err := writeJSONFile(*out, stdout, resp.Answer); err != nil {
		return adminErr(stderr, "enroll-answer", err)
	}
	if *out != "-" {
		fmt.Fprintf(stdout, "the TPM activated the challenge; answer written to %s; the verifier finishes with\n  tpmmux-verify enroll finish --answer %s --state state.json --enrolled DIR\n", *out, *out)
	}
	return 0
}

// violationMain is `tpmmux-bridge violation --vm NAME --reason TEXT`.
func violationMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge violation",
		Synopsis: []string{"--vm NAME (--reason TEXT [--detail TEXT] | --report FILE) [--control PATH]"},
		Summary:  "report a verifier's finding; the bridge enforces it",
		Description: `The bridge does what its enforce configuration says (log, webhook, pause), in order, and records
each action in the VM's log. Exit status 1 when an action failed.`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, time.Minute)
	vm := fs.String("vm", "", "the VM: its `NAME`, or an instance id (hex)")
	reason := fs.String("reason", "", "why, one line of `TEXT` (at most 256 bytes)")
	detail := fs.String("detail", "", "more detail, `TEXT` (at most 4096 bytes)")
	report := fs.String("report", "", "a tpmmux-verify --json report `FILE`: its reason (and first violations) are the reason and detail")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *vm == "" || (*reason == "" && *report == "") || fs.NArg() > 0 {
		cmd.UsageError(stderr, "--vm, and --reason or --report, are required")
		return cli.ExitUsage
	}
	if *report != "" {
		r, d, err := fromReport(*report)
		if err != nil {
			fmt.Fprintf(stderr, "tpmmux-bridge violation: %v\n", err)
			return 2
		}
		if *reason == "" {
			*reason = r
		}
		if *detail == "" {
			*detail = d
		}
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpViolation, VM: *vm, Reason: *reason, Detail: *detail})
	if err != nil {
		return adminErr(stderr, "violation", err)
	}
	e := resp.Enforcement
	if e == nil {
		return adminErr(stderr, "violation", fmt.Errorf("empty answer"))
	}
	if a.json {
		printJSON(stdout, e)
	} else {
		fmt.Fprintf(stdout, "violation on %s (instance %s): %s\n", e.VM, e.Instance, e.Reason)
		for _, r := range e.Actions {
			state := "done"
			if !r.OK {
				state = "FAILED"
			}
			rec := "not recorded"
			if r.Seq != nil {
				rec = fmt.Sprintf("record %d", *r.Seq)
			}
			fmt.Fprintf(stdout, "  %-8s %-6s %s (%s, %s)\n", r.Action, state, r.Detail, rec, time.Duration(r.Elapsed).Round(time.Millisecond))
		}
	}
	for _, r := range e.Actions {
		if !r.OK {
			return 1
		}
	}
	return 0
}

// fromReport takes the reason and the first violations of a verifier's
// JSON report.
func fromReport(path string) (reason, detail string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", err
	}
	var rep struct {
		Trusted    bool   `json:"trusted"`
		Reason     string `json:"reason"`
		Violations []struct {
			Seq    uint64 `json:"seq"`
			Path   string `json:"path"`
			Digest string `json:"digest"`
			Reason string `json:"reason"`
		} `json:"violations"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		return "", "", fmt.Errorf("report %s: %w", path, err)
	}
	if rep.Trusted || rep.Reason == "" {
		return "", "", fmt.Errorf("report %s says the VM is trusted: no violation to report", path)
	}
	var parts []string
	for i, v := range rep.Violations {
		if i == 5 {
			parts = append(parts, fmt.Sprintf("and %d more", len(rep.Violations)-5))
			break
		}
		parts = append(parts, fmt.Sprintf("record %d %s %s: %s", v.Seq, v.Path, v.Digest, v.Reason))
	}
	reason = rep.Reason
	if len(reason) > control.MaxReason {
		reason = reason[:control.MaxReason]
	}
	detail = strings.Join(parts, "; ")
	if len(detail) > control.MaxDetail {
		detail = detail[:control.MaxDetail]
	}
	return reason, detail, nil
}

// writeJSONFile writes v as indented JSON to path ("-": w).
func writeJSONFile(path string, w io.Writer, v any) error {
	if path == "-" {
		printJSON(w, v)
		return nil
	}
	return enroll.WriteJSON(path, v, 0o644)
}
