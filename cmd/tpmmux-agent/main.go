// Command tpmmux-agent is the tpmmux guest agent. It runs inside a VM,
// streams the guest's IMA measurement list to the host's tpmmux bridge, and
// fetches this VM's evidence for a verifier's nonce.
//
//	tpmmux-agent [run] [--transport vsock|virtio-serial|unix] [--unix PATH] [--ima PATH] [--control PATH] [-v]
//	tpmmux-agent attest --nonce HEX --out DIR [--checkpoint FILE] [--early] [--transport …] [--unix PATH] [--control PATH] [--timeout D]
//	tpmmux-agent bind --purpose NAME (--key PEM | --key-hash HEX) [--control PATH]
//
// attest writes DIR/evidence.cbor, DIR/evidence.json, DIR/identity.json,
// DIR/ak.pem and DIR/nonce.hex, so that
//
//	tpmmux-verify --evidence DIR/evidence.json --nonce $(cat DIR/nonce.hex) --identity DIR/identity.json --ak DIR/ak.pem
//
// checks them (with --checkpoint the evidence is the delta after a verifier
// checkpoint: verify it with tpmmux-verify --checkpoint). It asks the running agent through its control socket when
// one answers there (needed on virtio-serial, where the agent holds the
// only port), and the bridge directly otherwise.
//
// Exit codes: 0 success (run: stopped by a signal, or the VM instance
// ended), 1 failure, 2 usage error.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tpmmux/tpmmux/internal/agent"
	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/transport"
	"github.com/tpmmux/tpmmux/internal/verify"
	"github.com/tpmmux/tpmmux/internal/wire"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// usageError is a command line mistake (exit 2).
type usageError struct{ msg string }

// Error returns the message.
func (e *usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	wrap := func(f func(context.Context, []string, io.Writer, io.Writer) error) func([]string, io.Writer, io.Writer) int {
		return func(args []string, stdout, stderr io.Writer) int {
			return exitCode(f(ctx, args, stdout, stderr), stderr)
		}
	}
	root := &cli.Command{
		Name:       "tpmmux-agent",
		Synopsis:   []string{"[run] [flags]", "attest --out DIR [--nonce HEX] [flags]", "bind --purpose NAME (--key FILE | --key-hash HEX) [flags]"},
		Summary:    "the tpmmux guest agent: stream IMA measurements to the host, attest, bind keys",
		ManSection: 1,
		Description: `Runs inside a VM. run (the default) streams the guest's IMA measurement list to the host's
tpmmux bridge over vsock, virtio-serial or a unix socket, resuming after reconnects and reboots,
and serves the local control socket. attest fetches this VM's evidence for a verifier's nonce and
writes DIR/evidence.cbor, evidence.json, identity.json, ak.pem and nonce.hex, which

  tpmmux-verify --evidence DIR/evidence.json --nonce $(cat DIR/nonce.hex) --identity DIR/identity.json --ak DIR/ak.pem

checks. bind records a key (e.g. the VM's TLS key) in the VM's log, so relayed evidence is
refused.`,
		Subs: []cli.Sub{
			{Name: "run", Summary: "stream the IMA measurement list to the bridge (the default)", Main: wrap(runAgent)},
			{Name: "attest", Summary: "write this VM's evidence for a nonce", Main: wrap(attest)},
			{Name: "bind", Summary: "bind a key to this VM in its log", Main: wrap(bind)},
		},
		Sections: []cli.Section{
			{Title: "Exit status", Body: `0 success (run: stopped by a signal, or the VM instance ended); 1 failure; 2 usage error.`},
			{Title: "Files", Body: `/run/tpmmux-agent/agent.sock   the control socket (mode 0600)
/etc/default/tpmmux-agent      TPMMUX_AGENT_ARGS for the unit`},
			{Title: "See also", Body: `tpmmux-verify(1), tpmmux-bridge(8)`},
		},
	}
	if code, ok := root.Dispatch(args, "run", stdout, stderr); ok {
		return code
	}
	return root.UnknownSub(stderr, args[0])
}

// exitStatus is an exit code a command has already printed what it needs
// for (its --help, --version, or a flag error).
type exitStatus int

// Error says so.
func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// exitCode maps a subcommand's error to the exit code, printing it.
func exitCode(err error, stderr io.Writer) int {
	var ue *usageError
	var es exitStatus
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &es):
		return int(es)
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "tpmmux-agent: usage error: %v\n(tpmmux-agent --help for more)\n", err)
		return exitUsage
	default:
		fmt.Fprintf(stderr, "tpmmux-agent: %v\n", err)
		return exitFailure
	}
}

// common are the flags every command shares.
type common struct {
	transport, unix, serialName, control string
	verbose                              bool
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.transport, "transport", string(transport.KindVsock), "how to reach the bridge (`KIND`): vsock, virtio-serial or unix")
	fs.StringVar(&c.unix, "unix", "", "the bridge's unix socket `PATH` (--transport unix, development)")
	fs.StringVar(&c.serialName, "serial-name", transport.SerialPortName, "the virtio-serial port `NAME` (--transport virtio-serial)")
	fs.StringVar(&c.control, "control", agent.DefaultControlSocket, "the agent's local control socket `PATH` (empty: none)")
	fs.BoolVar(&c.verbose, "v", false, "verbose logging")
}

func (c *common) config(stderr io.Writer) (agent.Config, error) {
	cfg := agent.Config{Transport: transport.Kind(c.transport), UnixPath: c.unix, SerialName: c.serialName, ControlSocket: c.control}
	switch cfg.Transport {
	case transport.KindVsock, transport.KindSerial:
	case transport.KindUnix:
		if c.unix == "" {
			return cfg, usagef("--transport unix needs --unix PATH")
		}
	default:
		return cfg, usagef("--transport %q: want vsock, virtio-serial or unix", c.transport)
	}
	level := slog.LevelInfo
	if c.verbose {
		level = slog.LevelDebug
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	return cfg, nil
}

// parse parses the flags of cmd; a nil error means: go on.
func parse(cmd *cli.Command, args []string, stdout, stderr io.Writer) error {
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return exitStatus(code)
	}
	if fs := cmd.FlagSet(); fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := &cli.Command{
		Name:     "tpmmux-agent run",
		Synopsis: []string{"[--transport KIND] [--unix PATH] [--ima FILE] [--control PATH] [-v]"},
		Summary:  "stream the IMA measurement list to the bridge",
	}
	fs := cmd.FlagSet()
	var c common
	c.register(fs)
	imaPath := fs.String("ima", agent.DefaultIMAPath, "the binary IMA measurement list `FILE` (…_sha256 for the per-bank list)")
	hashAlg := fs.String("template-hash", "", "the list's template-hash algorithm `ALG`, sha1 or sha256 (default: from the file name)")
	bootID := fs.String("boot-id", agent.DefaultBootIDPath, "the `FILE` holding the guest boot id")
	poll := fs.Duration("poll", agent.DefaultPollInterval, "how often to look for new measurements (`DURATION`)")
	if err := parse(cmd, args, stdout, stderr); err != nil {
		return err
	}
	cfg, err := c.config(stderr)
	if err != nil {
		return err
	}
	cfg.IMAPath, cfg.TemplateHashAlg, cfg.BootIDPath, cfg.PollInterval = *imaPath, *hashAlg, *bootID, *poll
	a, err := agent.New(cfg)
	if err != nil {
		return usagef("%v", err)
	}
	if err := a.Preflight(); err != nil {
		return fmt.Errorf("cannot run: %w", err)
	}
	err = a.Run(ctx)
	if errors.Is(err, agent.ErrEnded) {
		return nil // the VM is going away; nothing to stream to
	}
	return err
}

func attest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := &cli.Command{
		Name:     "tpmmux-agent attest",
		Synopsis: []string{"--out DIR [--nonce HEX] [--transport KIND] [--unix PATH] [--control PATH] [--timeout DURATION]"},
		Summary:  "write this VM's evidence for a nonce",
		Description: `Asks the running agent through its control socket when one answers there (needed on
virtio-serial, where the agent holds the only port), and the bridge directly otherwise.`,
	}
	fs := cmd.FlagSet()
	var c common
	c.register(fs)
	nonceHex := fs.String("nonce", "", "the verifier's nonce, `HEX`, 1 to 64 bytes (default: 32 random bytes)")
	out := fs.String("out", "", "`DIR` to write the evidence files into")
	timeout := fs.Duration("timeout", time.Minute, "give up after this long")
	cpFile := fs.String("checkpoint", "", "a verifier's checkpoint `FILE` (tpmmux-verify --save-checkpoint): ask only for the evidence after it")
	early := fs.Bool("early", false, "ask the bridge for the log while it takes a quote shared with other requests (less wait when many verifiers attest at once; a bridge older than this option refuses it)")
	if err := parse(cmd, args, stdout, stderr); err != nil {
		return err
	}
	if *out == "" {
		return usagef("--out DIR is required")
	}
	var since *wire.Since
	if *cpFile != "" {
		b, err := os.ReadFile(*cpFile)
		if err != nil {
			return usagef("--checkpoint: %v", err)
		}
		var cp verify.Checkpoint
		if err := json.Unmarshal(b, &cp); err != nil {
			return usagef("--checkpoint %s is not a tpmmux-verify checkpoint: %v", *cpFile, err)
		}
		s := cp.Since()
		since = &wire.Since{Batch: s.Batch, Records: s.Records}
	}
	var nonce []byte
	if *nonceHex == "" {
		nonce = make([]byte, 32)
		rand.Read(nonce)
	} else {
		var err error
		if nonce, err = hex.DecodeString(strings.TrimSpace(*nonceHex)); err != nil {
			return usagef("--nonce %q is not hex", *nonceHex)
		}
	}
	if len(nonce) == 0 || len(nonce) > agent.MaxNonce {
		return usagef("--nonce of %d bytes: want 1 to %d", len(nonce), agent.MaxNonce)
	}
	cfg, err := c.config(stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, via, err := agent.AttestAnyWith(ctx, cfg, nonce, agent.AttestOptions{Since: since, Early: *early})
	if err != nil {
		return err
	}
	ev, err := evidence.Decode(resp.Evidence)
	if err != nil {
		return fmt.Errorf("attest: the bridge sent undecodable evidence: %w", err)
	}
	ident := conceal.Identity{UUID: resp.UUID, Instance: resp.Instance, Key: resp.Key}
	if ev.VM.UUID != conceal.FormatUUID(resp.UUID) {
		return fmt.Errorf("attest: evidence is for vm %s, the identity for %s", ev.VM.UUID, conceal.FormatUUID(resp.UUID))
	}
	if len(resp.AKPEM) == 0 {
		return errors.New("attest: the bridge sent no attestation key")
	}
	evJSON, err := json.MarshalIndent(ev, "", "  ")
	if err != nil {
		return fmt.Errorf("attest: encode evidence JSON: %w", err)
	}
	identJSON, err := json.MarshalIndent(ident, "", "  ")
	if err != nil {
		return fmt.Errorf("attest: encode identity: %w", err)
	}
	// identity.json holds the VM's key: the directory and it are private.
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return fmt.Errorf("attest: %w", err)
	}
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{"evidence.cbor", resp.Evidence, 0o644},
		{"evidence.json", append(evJSON, '\n'), 0o644},
		{"identity.json", append(identJSON, '\n'), 0o600},
		{"ak.pem", resp.AKPEM, 0o644},
		{"nonce.hex", []byte(hex.EncodeToString(nonce) + "\n"), 0o644},
	}
	for _, f := range files {
		if err := writeFile(filepath.Join(*out, f.name), f.data, f.mode); err != nil {
			return fmt.Errorf("attest: %w", err)
		}
	}
	fmt.Fprintf(stdout, "evidence for vm %s instance %x (%d records, via %s) written to %s\n",
		ev.VM.UUID, resp.Instance, len(ev.Records), via, *out)
	return nil
}

// writeFile writes data to path atomically (a temp file renamed over it).
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func bind(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cmd := &cli.Command{
		Name:     "tpmmux-agent bind",
		Synopsis: []string{"--purpose NAME (--key FILE | --key-hash HEX) [--control PATH]"},
		Summary:  "bind a key to this VM in its log",
		Description: `The key's hash is the SHA-256 of its DER SubjectPublicKeyInfo, as tpmmux-verify --bind-key
computes it. Goes through the running agent.`,
	}
	fs := cmd.FlagSet()
	var c common
	c.register(fs)
	purpose := fs.String("purpose", "", "what the key is for (`NAME`), e.g. tls (1 to 64 bytes)")
	keyHex := fs.String("key-hash", "", "SHA-256 of the public key to bind, `HEX` (32 bytes)")
	keyPath := fs.String("key", "", "PEM `FILE`: a public key, certificate or private key to bind")
	timeout := fs.Duration("timeout", time.Minute, "give up after this long")
	if err := parse(cmd, args, stdout, stderr); err != nil {
		return err
	}
	if *purpose == "" || len(*purpose) > agent.MaxPurpose {
		return usagef("--purpose of %d bytes: want 1 to %d", len(*purpose), agent.MaxPurpose)
	}
	if (*keyHex == "") == (*keyPath == "") {
		return usagef("give --key PEM or --key-hash HEX")
	}
	var key [32]byte
	if *keyPath != "" {
		b, err := os.ReadFile(*keyPath)
		if err != nil {
			return usagef("--key: %v", err)
		}
		if key, err = verify.KeyHashPEM(b); err != nil {
			return usagef("--key %s: %v", *keyPath, err)
		}
	} else {
		kb, err := hex.DecodeString(strings.TrimSpace(*keyHex))
		if err != nil || len(kb) != 32 {
			return usagef("--key-hash must be 32 bytes of hex")
		}
		copy(key[:], kb)
	}
	if c.control == "" {
		return usagef("bind goes through the running agent: --control must name its socket")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	if err := agent.BindControl(ctx, c.control, *purpose, key); err != nil {
		if agent.NoAgent(err) {
			return fmt.Errorf("bind: no agent answers on %s: start tpmmux-agent run first: %w", c.control, err)
		}
		return fmt.Errorf("bind: %w", err)
	}
	fmt.Fprintf(stdout, "bound %s key %x\n", *purpose, key)
	return nil
}
