package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/tpmmux/tpmmux/internal/tpm/swtpmproc"
)

// manufacture provisions a swtpm state directory as a TPM vendor would (EK
// certificates from a local CA, swtpmproc.Manufacture), so that the host
// it serves can be enrolled (docs/trust.md), and writes the CA bundle a
// verifier's --ek-ca (and a bridge's migration.ek_ca) takes.
func manufacture(args []string) error {
	fs := flag.NewFlagSet("manufacture", flag.ExitOnError)
	state := fs.String("state", "", "the swtpm state directory to provision")
	caDir := fs.String("ca", "", "the local CA's directory (made on first use; several TPMs may share it)")
	bundle := fs.String("bundle", "", "write the CA bundle (root and issuer, PEM) to this file")
	fs.Parse(args)
	if *state == "" || *caDir == "" || *bundle == "" {
		return fmt.Errorf("usage: e2etool manufacture -state DIR -ca DIR -bundle FILE")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ca, err := swtpmproc.Manufacture(ctx, *state, *caDir)
	if err != nil {
		return fmt.Errorf("manufacture %s: %w", *state, err)
	}
	b, err := ca.Bundle()
	if err != nil {
		return fmt.Errorf("read the CA bundle of %s: %w", *caDir, err)
	}
	if err := os.WriteFile(*bundle, b, 0o644); err != nil {
		return fmt.Errorf("write the CA bundle: %w", err)
	}
	return nil
}
