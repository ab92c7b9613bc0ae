package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

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
	fs := flag.NewFlagSet("enroll-request", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var a adminFlags
	a.register(fs, time.Minute)
	out := fs.String("out", "", "write the enrollment request (JSON) here; - for stdout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *out == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: tpmmux-bridge enroll-request --out req.json [--control PATH]")
		return 2
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
	fs := flag.NewFlagSet("enroll-answer", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var a adminFlags
	a.register(fs, time.Minute)
	chalPath := fs.String("challenge", "", "the verifier's challenge (JSON)")
	out := fs.String("out", "", "write the answer (JSON) here; - for stdout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *chalPath == "" || *out == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: tpmmux-bridge enroll-answer --challenge chal.json --out ans.json [--control PATH]")
		return 2
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
	fs := flag.NewFlagSet("violation", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var a adminFlags
	a.register(fs, time.Minute)
	vm := fs.String("vm", "", "the VM: its name, or an instance id (hex)")
	reason := fs.String("reason", "", "why (one line, at most 256 bytes)")
	detail := fs.String("detail", "", "more detail (at most 4096 bytes)")
	report := fs.String("report", "", "a tpmmux-verify --json report: its reason (and first violations) are the reason and detail")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *vm == "" || (*reason == "" && *report == "") || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "usage: tpmmux-bridge violation --vm NAME (--reason TEXT [--detail TEXT] | --report REPORT.json) [--control PATH]")
		return 2
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
