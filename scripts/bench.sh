#!/usr/bin/env bash
# Runs the tpmmux benchmark and prints its one table (docs/performance.md
# explains every row). Installs what it needs first (swtpm for the swtpm
# rows and the vTPM baseline of P5), with scripts/setup.sh.
#
#   scripts/bench.sh                 full run, about 17 minutes on 2 cores (P7-P9 about 8)
#   scripts/bench.sh --quick         one run per figure, smaller sizes, about 4 minutes
#   scripts/bench.sh --tpm sim,hw    any of tpmmux-bench's flags
#   scripts/bench.sh --only P9       guest boot time only (QEMU guests; P9 is skipped
#                                    without qemu-system-x86, busybox-static and the
#                                    kernel of scripts/e2e/build-guest.sh)
#
# Run it on a quiet machine: every figure is measured against its baseline
# in the same run, but a loaded machine slows both, and the CPU-bound rows
# (P1 on sim, P3, P4) move with the load. The table's header prints the load
# average before and after.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh test
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
bin=$(mktemp -d)/tpmmux-bench
trap 'rm -rf "$(dirname "$bin")"' EXIT
go build -o "$bin" ./cmd/tpmmux-bench
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(go version)" >&2
"$bin" "$@"
