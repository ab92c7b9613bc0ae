// Command tpmmux-bridge is the host side of tpmmux: it owns the TPM, the
// durable log and the per-VM channels, and hands out per-VM evidence.
//
//	tpmmux-bridge run [--config FILE] [flags]    the daemon
//	tpmmux-bridge status | vms [--all]           ask the running daemon
//	tpmmux-bridge evidence --vm NAME --nonce HEX --out DIR
//	tpmmux-bridge enroll-request --out req.json | enroll-answer --challenge chal.json --out ans.json
//	tpmmux-bridge migration-cert [--config FILE]     the tls_sha256 peers pin
//	tpmmux-bridge violation --vm NAME --reason TEXT [--detail TEXT]
//	tpmmux-bridge demo [--vms N] [--records M] [--tpm sim|swtpm:ADDR] [--out DIR]
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/tpmmux/tpmmux/internal/cli"
)

// version is the bridge version written into epoch records.
const version = cli.Version

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := rootCommand(ctx)
	if code, ok := root.Dispatch(args, "", stdout, stderr); ok {
		return code
	}
	return root.UnknownSub(stderr, args[0])
}

// rootCommand describes tpmmux-bridge and its commands: the source of its
// --help and its man page.
func rootCommand(ctx context.Context) *cli.Command {
	sub := func(name, summary string, main func(context.Context, []string, io.Writer, io.Writer) int) cli.Sub {
		return cli.Sub{Name: name, Summary: summary, Main: func(args []string, stdout, stderr io.Writer) int {
			return main(ctx, args, stdout, stderr)
		}}
	}
	return &cli.Command{
		Name:       "tpmmux-bridge",
		Synopsis:   []string{"COMMAND [flags]"},
		Summary:    "share one host TPM among KVM/QEMU VMs: the daemon and its admin commands",
		ManSection: 8,
		Description: `tpmmux-bridge run is the host daemon: it owns the TPM, the durable log and the per-VM guest
channels, folds every VM's IMA measurements, concealed, into one PCR, and hands out per-VM
evidence. The libvirt hook (tpmmux-hook) tells it about each domain's start and stop.

status, vms, evidence, enroll-request, enroll-answer and violation talk to the running daemon
over its control socket (--control PATH, default /run/tpmmux/control.sock; root only).`,
		Subs: []cli.Sub{
			sub("run", "run the bridge daemon", runMain),
			sub("status", "show the running bridge's state", statusMain),
			sub("vms", "list the VM instances (--all: ended ones too)", vmsMain),
			sub("evidence", "write a VM's evidence and what verifies it", evidenceMain),
			sub("enroll-request", "the host's AK enrollment request for a verifier", enrollRequestMain),
			sub("enroll-answer", "have the TPM activate a verifier's challenge", enrollAnswerMain),
			sub("migration-cert", "print the sha256 of the bridge's migration certificate (made if missing), which peers pin", migrationCertMain),
			sub("violation", "report a verifier's finding; the bridge enforces (log, webhook, pause)", violationMain),
			sub("demo", "run the whole flow in one process (default: embedded TPM simulator)", demoMain),
		},
		Sections: []cli.Section{
			{Title: "Files", Body: `/etc/tpmmux/bridge.json     the daemon's configuration (every key: docs/hook.md)
/var/lib/tpmmux/log.db      the durable log (mode 0600)
/run/tpmmux/control.sock    the control socket (root only)
/run/tpmmux/serial/         the per-VM virtio-serial sockets`},
			{Title: "Exit status", Body: `0 success; 1 failure (status: the bridge is faulted); 2 usage error.`},
			{Title: "See also", Body: `tpmmux-hook(8), tpmmux-verify(1), tpmmux-agent(1)`},
		},
	}
}
