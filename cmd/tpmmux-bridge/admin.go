package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/control"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/verify"
)

// adminFlags are the flags every admin command shares.
type adminFlags struct {
	control string
	timeout time.Duration
	json    bool
}

func (a *adminFlags) register(fs *flag.FlagSet, timeout time.Duration) {
	fs.StringVar(&a.control, "control", control.DefaultSocket, "the bridge's control socket `PATH`")
	fs.DurationVar(&a.timeout, "timeout", timeout, "give up after this `DURATION`")
	fs.BoolVar(&a.json, "json", false, "print JSON")
}

func (a *adminFlags) call(ctx context.Context, req *control.Request) (*control.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	c := &control.Client{Path: a.control}
	return c.Call(ctx, req)
}

func adminErr(stderr io.Writer, cmd string, err error) int {
	fmt.Fprintf(stderr, "tpmmux-bridge %s: %v\n", cmd, err)
	return 1
}

func printJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// statusMain is `tpmmux-bridge status`.
func statusMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge status",
		Synopsis: []string{"[--json] [--control PATH]"},
		Summary:  "show the running bridge's state",
		Description: `The TPM, the log's epoch, the PCR, records and batches, live VMs, listeners and sessions, and a
fault if the log and the PCR are out of step (then the exit status is 1).`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, 10*time.Second)
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpStatus})
	if err != nil {
		return adminErr(stderr, "status", err)
	}
	s := resp.Status
	if s == nil {
		return adminErr(stderr, "status", fmt.Errorf("empty answer"))
	}
	if a.json {
		printJSON(stdout, s)
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	row := func(k, f string, v ...any) { fmt.Fprintf(tw, "%s\t"+f+"\n", append([]any{k}, v...)...) }
	row("bridge:", "tpmmux-bridge %s on %s, up %s", s.Version, s.Host, time.Since(s.Started).Round(time.Second))
	row("tpm:", "%s", s.TPM)
	fault := "none"
	if s.Fault != "" {
		fault = s.Fault
	}
	row("fault:", "%s", fault)
	row("log:", "epoch %d, %d batches, %d entries", s.Epoch, s.Batches, s.Entries)
	row("pcr:", "%d = %s (quotes also cover host PCRs %s)", s.PCR, s.PCRValue, pcrList(s.HostPCRs))
	row("records:", "%d committed in %d extends (largest batch %d), %d queued; %d quotes", s.Records, s.Extends, s.MaxBatch, s.Queued, s.Quotes)
	row("vms:", "%d live, %d listeners, %d guest sessions, %d connections refused", s.LiveVMs, s.Listeners, s.Sessions, s.Refused)
	vs := "on"
	if !s.Vsock {
		vs = "off (" + s.VsockNote + ")"
	}
	row("vsock:", "%s", vs)
	row("mode:", "%s", s.Mode)
	row("control:", "%s", s.ControlSocket)
	row("serial dir:", "%s", s.SerialDir)
	if s.Metrics != "" {
		row("metrics:", "http://%s/metrics", s.Metrics)
	}
	if m := s.Migration; m != nil {
		listen := m.Listen
		if listen == "" {
			listen = "no listener"
		}
		row("migration:", "%s, peers %s; %d reserved here, %d incoming", listen, strings.Join(m.Peers, ","), m.Reserved, m.Incoming)
		row("migration cert:", "sha256 %s (the tls_sha256 peers pin)", m.CertSHA256)
	}
	tw.Flush()
	if s.Fault != "" {
		return 1
	}
	return 0
}

func pcrList(ps []int) string {
	if len(ps) == 0 {
		return "none"
	}
	var parts []string
	for i := 0; i < len(ps); {
		j := i
		for j+1 < len(ps) && ps[j+1] == ps[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, fmt.Sprintf("%d-%d", ps[i], ps[j]))
		} else {
			parts = append(parts, fmt.Sprint(ps[i]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// vmsMain is `tpmmux-bridge vms`: a table of the live VM instances (with
// --all, every instance the log holds).
func vmsMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge vms",
		Synopsis: []string{"[--all] [--json] [--control PATH]"},
		Summary:  "list the VM instances",
		Description: `A table of the live VM instances: NAME STATE UUID INSTANCE CID RECORDS SESSIONS LISTENERS. With
--all, every instance the log holds, ended ones with the reason they ended.`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, 10*time.Second)
	all := fs.Bool("all", false, "also list ended instances")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpVMs, All: *all})
	if err != nil {
		return adminErr(stderr, "vms", err)
	}
	if a.json {
		vms := resp.VMs
		if vms == nil {
			vms = []control.VM{} // an empty list, not null
		}
		printJSON(stdout, vms)
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	// INSTANCE and ID are prefixes; evidence --vm takes any unique prefix.
	fmt.Fprintln(tw, "NAME\tSTATE\tUUID\tINSTANCE\tID\tCID\tRECORDS\tSESSIONS\tLISTENERS")
	for _, v := range resp.VMs {
		state := "live"
		if !v.Live {
			state = "ended: " + v.EndedBy
		}
		inst, id := shortHex(v.Instance, 12), shortHex(v.ID, 16)
		cid := "-"
		if v.CID != 0 {
			cid = fmt.Sprint(v.CID)
		}
		var ls []string
		for _, l := range v.Listeners {
			ls = append(ls, l.Kind+":"+l.Addr)
		}
		lst := strings.Join(ls, " ")
		if lst == "" {
			lst = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\n", v.Name, state, v.UUID, inst, id, cid, v.Records, v.Sessions, lst)
	}
	tw.Flush()
	for _, v := range resp.VMs {
		if v.Warning != "" {
			fmt.Fprintf(stdout, "warning: %s: %s\n", v.Name, v.Warning)
		}
	}
	return 0
}

// shortHex is the first n digits of a hex value, for a table.
func shortHex(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// evidenceMain is `tpmmux-bridge evidence --vm NAME --nonce HEX --out DIR`:
// the VM's evidence and what a verifier needs with it, as files.
func evidenceMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge evidence",
		Synopsis: []string{"--vm NAME --nonce HEX --out DIR [--control PATH]"},
		Summary:  "write a VM's evidence and what verifies it",
		Description: `Writes evidence.json, evidence.cbor, identity.json (mode 0600: it holds the VM's secret),
ak.pem, nonce.hex, quote.msg and quote.sig into DIR, and prints the tpmmux-verify command that
checks them. For a VM that has ended it writes the post-mortem evidence: the final quote the
bridge kept at its teardown (verify it with --post-mortem; no nonce.hex then, since the
nonce is not in that quote).`,
	}
	fs := cmd.FlagSet()
	var a adminFlags
	a.register(fs, time.Minute)
	vm := fs.String("vm", "", "the `VM`: its name, uuid, instance or id, or a unique prefix (4+ hex digits) of the instance or id, as tpmmux-bridge vms --all shows them")
	nonceHex := fs.String("nonce", "", "the verifier's nonce, `HEX` (1 to 64 bytes)")
	out := fs.String("out", "", "write the files into this `DIR`")
	cpFile := fs.String("checkpoint", "", "a verifier's checkpoint `FILE` (tpmmux-verify --save-checkpoint): only the evidence after it")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	if *vm == "" || *out == "" {
		cmd.UsageError(stderr, "--vm and --out are required")
		return cli.ExitUsage
	}
	var since *evidence.Since
	if *cpFile != "" {
		b, err := os.ReadFile(*cpFile)
		if err != nil {
			fmt.Fprintf(stderr, "tpmmux-bridge evidence: --checkpoint: %v\n", err)
			return 2
		}
		var cp verify.Checkpoint
		if err := json.Unmarshal(b, &cp); err != nil {
			fmt.Fprintf(stderr, "tpmmux-bridge evidence: --checkpoint %s is not a tpmmux-verify checkpoint: %v\n", *cpFile, err)
			return 2
		}
		since = cp.Since()
	}
	nonce, err := hex.DecodeString(strings.TrimSpace(*nonceHex))
	if err != nil || len(nonce) > 64 {
		fmt.Fprintf(stderr, "tpmmux-bridge evidence: --nonce %q is not 1 to 64 bytes of hex\n", *nonceHex)
		return 2
	}
	resp, err := a.call(ctx, &control.Request{Op: control.OpEvidence, VM: *vm, Nonce: nonce, Since: since})
	if err != nil {
		return adminErr(stderr, "evidence", err)
	}
	e := resp.Evidence
	if e == nil {
		return adminErr(stderr, "evidence", fmt.Errorf("empty answer"))
	}
	if err := writeEvidenceFiles(*out, e, nonce); err != nil {
		return adminErr(stderr, "evidence", err)
	}
	if a.json {
		printJSON(stdout, map[string]any{"vm": e.VM, "dir": *out, "post_mortem": e.PostMortem})
		return 0
	}
	check := "--nonce " + hex.EncodeToString(nonce)
	if *cpFile != "" {
		check += " --checkpoint " + *cpFile
	}
	if e.PostMortem {
		check = "--post-mortem"
		fmt.Fprintf(stdout, "%s has ended: this is the final quote the bridge kept at its teardown (the nonce is not in it)\n", e.VM)
	}
	fmt.Fprintf(stdout, "evidence of %s written to %s; check it with:\n  tpmmux-verify --evidence %s %s --identity %s --ak %s\n",
		e.VM, *out, filepath.Join(*out, "evidence.json"), check, filepath.Join(*out, "identity.json"), filepath.Join(*out, "ak.pem"))
	return 0
}

// writeEvidenceFiles writes the file set of the demo's --out, for one VM:
// evidence.json, evidence.cbor, identity.json (0600: it holds the VM's
// secret), ak.pem, nonce.hex, quote.msg and quote.sig.
func writeEvidenceFiles(dir string, e *control.Evidence, nonce []byte) error {
	ev, err := evidence.Decode(e.Evidence)
	if err != nil {
		return fmt.Errorf("the bridge's evidence does not decode: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	evJSON, err := json.MarshalIndent(ev, "", " ")
	if err != nil {
		return err
	}
	ident, err := json.MarshalIndent(&e.Identity, "", " ")
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"evidence.json", append(evJSON, '\n'), 0o644},
		{"evidence.cbor", e.Evidence, 0o644},
		{"identity.json", append(ident, '\n'), 0o600},
		{"ak.pem", []byte(e.AKPEM), 0o644},
		{"nonce.hex", []byte(hex.EncodeToString(nonce) + "\n"), 0o644},
		{"quote.msg", ev.Quote.Attest, 0o644},
		{"quote.sig", ev.Quote.Signature, 0o644},
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if f.name == "nonce.hex" && e.PostMortem {
			// The final quote was made at the teardown: the nonce is not in
			// it, and a nonce.hex would invite --nonce, which must fail.
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			continue
		}
		if err := os.WriteFile(p, f.data, f.mode); err != nil {
			return err
		}
		// WriteFile keeps an existing file's mode: make it what it must be.
		if err := os.Chmod(p, f.mode); err != nil {
			return err
		}
	}
	return nil
}
