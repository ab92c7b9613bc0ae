package main

import (
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/tpmmux/tpmmux/internal/conceal"
	"github.com/tpmmux/tpmmux/internal/evidence"
	"github.com/tpmmux/tpmmux/internal/ima"
	"github.com/tpmmux/tpmmux/internal/record"
)

// paths prints the file paths of every measurement record in an evidence
// file, one per line: what a verifier of that VM can read (of every
// segment, for a migrated VM).
func paths(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: e2etool paths EVIDENCE")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	ev, err := evidence.Decode(b)
	if err != nil {
		return err
	}
	// A migrated VM's earlier segments first, oldest first (Previous is
	// flat), then the current one: the VM's whole measurement history.
	for i := range ev.Previous {
		if err := printPaths(&ev.Previous[i]); err != nil {
			return fmt.Errorf("previous segment %d: %w", i, err)
		}
	}
	return printPaths(ev)
}

// printPaths prints the file paths of ev's own measurement records.
func printPaths(ev *evidence.Evidence) error {
	for _, r := range ev.Records {
		rec, err := record.Unmarshal(r.R)
		if err != nil {
			return err
		}
		if rec.Measurement == nil {
			continue
		}
		f, err := ima.DecodeTemplate(rec.Measurement.Template, rec.Measurement.TemplateData)
		if err != nil {
			return err
		}
		fmt.Println(f.Path)
	}
	return nil
}

// extradata prints H("tpmmux/v1/nonce" || nonce || id), the qualifying
// data tpm2_checkquote -q expects for a plain quote.
func extradata(args []string) error {
	fs := flag.NewFlagSet("extradata", flag.ExitOnError)
	nonceHex := fs.String("nonce", "", "nonce, hex")
	identPath := fs.String("identity", "", "identity.json")
	fs.Parse(args)
	nonce, err := hex.DecodeString(strings.TrimSpace(*nonceHex))
	if err != nil {
		return err
	}
	b, err := os.ReadFile(*identPath)
	if err != nil {
		return err
	}
	var ident conceal.Identity
	if err := json.Unmarshal(b, &ident); err != nil {
		return err
	}
	d := conceal.NonceData(nonce, ident.ID())
	fmt.Println(hex.EncodeToString(d[:]))
	return nil
}
