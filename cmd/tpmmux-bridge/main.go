// Command tpmmux-bridge is the host side of tpmmux: it owns the TPM, the
// durable log and the per-VM channels, and hands out per-VM evidence.
//
//	tpmmux-bridge run [--config FILE] [flags]    the daemon
//	tpmmux-bridge status | vms [--all]           ask the running daemon
//	tpmmux-bridge evidence --vm NAME --nonce HEX --out DIR
//	tpmmux-bridge enroll-request --out req.json | enroll-answer --challenge chal.json --out ans.json
//	tpmmux-bridge violation --vm NAME --reason TEXT [--detail TEXT]
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
	case "run":
		return runMain(ctx, args[1:], stdout, stderr)
	case "status":
		return statusMain(ctx, args[1:], stdout, stderr)
	case "vms":
		return vmsMain(ctx, args[1:], stdout, stderr)
	case "evidence":
		return evidenceMain(ctx, args[1:], stdout, stderr)
	case "enroll-request":
		return enrollRequestMain(ctx, args[1:], stdout, stderr)
	case "enroll-answer":
		return enrollAnswerMain(ctx, args[1:], stdout, stderr)
	case "violation":
		return violationMain(ctx, args[1:], stdout, stderr)
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
  run       run the bridge daemon (tpmmux-bridge run --help for its flags)
  status    show the running bridge's state
  vms       list the live VMs (--all: ended instances too)
  evidence  write a VM's evidence and what verifies it: --vm NAME --nonce HEX --out DIR
  enroll-request  the host's AK enrollment request for a verifier: --out req.json
  enroll-answer   have the TPM activate a verifier's challenge: --challenge chal.json --out ans.json
  violation       report a verifier's finding; the bridge enforces (log, webhook, pause): --vm NAME --reason TEXT
  demo      run the whole flow in one process (default: embedded TPM simulator)
  version   print the version

status, vms, evidence, enroll-request, enroll-answer and violation talk to the daemon over its control socket
(--control PATH, default /run/tpmmux/control.sock; root only).`)
}
