// Command tpmmux-bridge is the host side of tpmmux: it owns the TPM, the
// durable log and the per-VM channels, and hands out per-VM evidence.
//
//	tpmmux-bridge demo [--vms N] [--records M] [--tpm sim|swtpm:ADDR] [--out DIR]
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is the bridge version written into epoch records.
const version = "0.1.0"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "demo":
		return demoMain(ctx, args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "tpmmux-bridge", version)
		return 0
	case "help", "-h", "--help":
		usage(stdout)
		return 0
	}
	fmt.Fprintf(stderr, "tpmmux-bridge: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, `usage: tpmmux-bridge COMMAND [flags]

commands:
  demo     run the whole flow in one process (default: embedded TPM simulator)
  version  print the version`)
}
