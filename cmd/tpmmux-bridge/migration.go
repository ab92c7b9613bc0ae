package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/tpmmux/tpmmux/internal/cli"
	"github.com/tpmmux/tpmmux/internal/daemon"
)

// migrationCertMain is `tpmmux-bridge migration-cert [--config FILE]`: the
// sha256 of the bridge's migration TLS certificate, which every peer puts
// in its migration.peers[].tls_sha256. The certificate is made under
// state_dir when the configuration names none and none exists yet, so an
// operator can pin it before the first start.
func migrationCertMain(_ context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := &cli.Command{
		Name:     "tpmmux-bridge migration-cert",
		Synopsis: []string{"[--config FILE] [--host NAME]"},
		Summary:  "print the sha256 of the bridge's migration certificate, which peers pin",
		Description: `Reads the configuration as "run" does and prints the hex sha256 of the DER of the migration
certificate (migration.cert, or STATE_DIR/migration/cert.pem, made with its key on first use), then
the peer entry another bridge's migration.peers takes for this one (docs/migration.md).`,
	}
	fs := cmd.FlagSet()
	cfgPath := fs.String("config", daemon.DefaultConfigFile, "configuration `FILE` (JSON); a missing default file means all defaults")
	host := fs.String("host", "", "this host's `NAME` in peers' configuration (default: the configuration's host, else the system's)")
	if code, done := cmd.Parse(args, stdout, stderr); done {
		return code
	}
	explicit := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "config" {
			explicit = true
		}
	})
	cfg, err := daemon.LoadConfig(*cfgPath, !explicit)
	if err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge migration-cert: %v\n", err)
		return 1
	}
	name := *host
	if name == "" {
		name = cfg.Host
	}
	if name == "" {
		name, _ = os.Hostname()
	}
	pin, err := cfg.Migration.CertSHA256(cfg.StateDir, name)
	if err != nil {
		fmt.Fprintf(stderr, "tpmmux-bridge migration-cert: %v\n", err)
		return 1
	}
	addr := cfg.Migration.Listen
	if addr == "" {
		addr = "HOST:PORT (this bridge has no migration.listen)"
	}
	fmt.Fprintln(stdout, pin)
	fmt.Fprintf(stdout, "peer entry for this bridge: {\"name\": %q, \"address\": %q, \"tls_sha256\": %q, \"enrolled\": \"/etc/tpmmux/peers/%s.json\"}\n", name, addr, pin, name)
	return 0
}
