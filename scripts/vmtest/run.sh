#!/usr/bin/env bash
# Runs the tests that need a real AF_VSOCK stack inside a QEMU (TCG) guest
# booted from the e2e guest kernel (Debian 6.1, scripts/e2e/build-guest.sh),
# since this host's kernel has neither vsock_loopback nor vhost_vsock.
#
#   run.sh [--out DIR] [--keep] [--timeout SEC] [--nested] [--smp N]
#
#   --out DIR      work dir (default: a new /tmp/tpmmux-vmtest.XXXXXX,
#                  removed on success unless --keep)
#   --timeout SEC  limit for the whole guest run (default 300, 1500 with
#                  --nested)
#   --nested       also run the nested vhost-vsock guest (see below; it
#                  takes several minutes more, so CI does not)
#   --smp N        vCPUs of the guest (default 2)
#
# How (as cilium/ebpf's run-tests.sh does it: build on the host, run in the
# VM, report back): the test binaries are built here with `go test -c`,
# statically linked (internal/agent's tests use the TPM simulator, which is
# cgo and OpenSSL's libcrypto: linked with -extldflags -static against
# libcrypto.a, so the guest needs no libc), put with their testdata in a
# busybox initramfs, and /init (init.sh) loads vsock, vsock_loopback and
# vhost_vsock (module files from the kernel's .deb, modules.sh), runs the
# binaries with TPMMUX_VSOCK_REAL=1 and sends their -test.v output over a
# virtio-serial port to a file here. Console output goes to console.log.
#
# Nested: the guest also holds this host's qemu-system-x86_64 with its
# libraries and firmware, and an inner initramfs (inner-init.sh). The test
# TestNestedVsockBridge (internal/agent) serves a bridge on the outer
# guest's /dev/vhost-vsock and starts the inner TCG guest with
# -device vhost-vsock-pci,guest-cid=N, whose agent test streams over a
# real guest-to-host vsock.
#
# Verdict: exit 0 only if every binary exited 0, at least one test ran, and
# no test was skipped (a vsock test that skips in the guest means the stack
# was not there). The last line says how many vsock tests ran.
#
# Environment: TPMMUX_VMTEST_ACCEL (default tcg), those of build-guest.sh.
set -euo pipefail
E2E_PROG=vmtest
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=../e2e/lib.sh
. "$here/../e2e/lib.sh"

usage() { sed -n '/^#   run.sh/,/^#   --smp N/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

work='' keep='' timeout='' nested='' smp=2
while (($#)); do
  case "$1" in
    --out) work=${2:?}; shift 2 ;;
    --keep) keep=1; shift ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --nested) nested=1; shift ;;
    --smp) smp=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) e2e_log "unknown argument $1"; usage ;;
  esac
done

[ -n "$timeout" ] || timeout=$([ -n "$nested" ] && echo 1500 || echo 300)
t0=$(e2e_now)
if [ -n "$work" ]; then mkdir -p "$work"; else work=$(mktemp -d /tmp/tpmmux-vmtest.XXXXXX); fi
work=$(cd "$work" && pwd)
qpid='' ok=''
cleanup() {
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill "$qpid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$qpid" 2>/dev/null || true
  fi
  [ -n "$qpid" ] && wait "$qpid" 2>/dev/null || true
  if [ -n "$ok" ] && [ -z "$keep" ]; then rm -rf "$work"; else e2e_log "work dir kept: $work"; fi
}
trap cleanup EXIT
fail() {
  e2e_log "FAIL: $*"
  if [ -f "$work/console.log" ]; then
    e2e_log "console (last 30 lines):"
    tail -n 30 "$work/console.log" | sed 's/^/    /' >&2
  fi
  [ -s "$work/qemu.log" ] && { e2e_log "QEMU stderr:"; tail -n 20 "$work/qemu.log" | sed 's/^/    /' >&2; }
  exit 1
}

# ---- kernel and modules ---------------------------------------------------------
e2e_ensure_pkgs qemu-system-x86 busybox-static cpio xz-utils libssl-dev file
"$repo/scripts/e2e/build-guest.sh" "$work/base" >/dev/null 2>"$work/build-guest.log" ||
  { cat "$work/build-guest.log" >&2; fail "build-guest.sh"; }
# shellcheck disable=SC1091
. "$work/base/guest.env" # KERNEL, KERNEL_PKG
# The outer guest plays the host: vhost_vsock as on a KVM host (the local
# CID is then 2, the host CID, which vsock.Listen binds; with
# vsock_loopback alone it would be 1 and a dial to the host CID would be
# reset), and vsock_loopback, which carries a dial to the host CID back to
# this kernel. Not vmw_vsock_virtio_transport: it would be the
# guest-to-host transport, and a dial to the host CID would go to a virtio
# device that is not there instead of staying on the loopback.
outer_mods=(virtio_pci virtio_console vsock_loopback vhost_vsock)
inner_mods=(virtio_pci vmw_vsock_virtio_transport)
mdir=$("$here/modules.sh" "$KERNEL_PKG" "${outer_mods[@]}" "${inner_mods[@]}")
t_kernel=$(e2e_now)

# load_order M...: M and what they need, dependencies first, once each.
load_order() {
  local -A seen=()
  local out=()
  visit() {
    local m=$1 d
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    for d in $(cat "$mdir/$m.deps"); do visit "$d"; done
    out+=("$m")
  }
  for m in "$@"; do visit "$m"; done
  printf '%s\n' "${out[@]}"
}

# ---- test binaries ---------------------------------------------------------------
bin=$work/bin
mkdir -p "$bin"
(
  cd "$repo"
  CGO_ENABLED=0 go test -c -o "$bin/transport.test" ./internal/transport
  # The simulator's C code and libcrypto, linked statically; osusergo and
  # netgo keep glibc's NSS (which cannot be linked statically) out.
  CGO_ENABLED=1 go test -c -tags osusergo,netgo -o "$bin/agent.test" \
    -ldflags '-linkmode external -extldflags "-static -Wl,--no-warnings"' ./internal/agent
) >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; fail "go test -c"; }
for b in "$bin"/*.test; do
  file -L "$b" | grep -q 'statically linked' || fail "$b is not statically linked: $(file -L "$b")"
done
t_build=$(e2e_now)

# ---- initramfs -------------------------------------------------------------------
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
# pack DIR OUT: newc cpio, sorted, fixed mtimes, owned by root.
pack() {
  local r=$1 out=$2
  find "$r" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  (cd "$r" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) >"$out"
}
# base_tree DIR INIT MODULE...: busybox, /init and the modules.
base_tree() {
  local r=$1 init=$2 applet m
  shift 2
  mkdir -p "$r"/{bin,sbin,dev,proc,sys,run,tmp,root,lib/modules,vmtest}
  chmod 1777 "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$r/bin/$applet"
  done
  install -m 0755 "$init" "$r/init"
  load_order "$@" >"$r/lib/modules/names"
  while read -r m; do cp "$mdir/$m.ko" "$r/lib/modules/"; echo "$m.ko"; done <"$r/lib/modules/names" >"$r/lib/modules/load-order"
  rm "$r/lib/modules/names"
  if [ "$(id -u)" = 0 ]; then mknod -m 0600 "$r/dev/console" c 5 1; fi
}
# add_pkg DIR PKG BINARY: the test binary of internal/PKG at /src/internal/PKG
# (the directory go test runs it in), with the testdata it reads.
add_pkg() {
  local r=$1 pkg=$2 b=$3
  mkdir -p "$r/src/internal/$pkg"
  cp "$bin/$b" "$r/src/internal/$pkg/$b"
}

outer=$work/outer
base_tree "$outer" "$here/init.sh" "${outer_mods[@]}"
add_pkg "$outer" transport transport.test
add_pkg "$outer" agent agent.test
mkdir -p "$outer/src/internal/ima/testdata"
cp "$repo/internal/ima/testdata/guest-imasig-sha256.bin" "$outer/src/internal/ima/testdata/"
{
  echo "transport /src/internal/transport transport.test ^(TestRealVsock|TestDialVsockLoopback\$)"
  echo "agent /src/internal/agent agent.test ^TestRealVsock"
} >"$outer/vmtest/plan"
echo "export TPMMUX_VSOCK_REAL=1" >"$outer/vmtest/env"

if [ -n "$nested" ]; then
  # The inner guest: its own initramfs, the uncompressed kernel (a PVH
  # boot: decompressing vmlinuz in a TCG guest in a TCG guest takes
  # minutes), the agent's test binary (stripped: less to unpack) and the
  # real IMA list.
  inner=$work/inner
  base_tree "$inner" "$here/inner-init.sh" "${inner_mods[@]}"
  mkdir -p "$inner/src/internal/agent"
  strip -o "$inner/src/internal/agent/agent.test" "$bin/agent.test"
  mkdir -p "$inner/src/internal/ima/testdata"
  cp "$repo/internal/ima/testdata/guest-imasig-sha256.bin" "$inner/src/internal/ima/testdata/"
  n=$outer/vmtest/nested
  mkdir -p "$n/firmware"
  pack "$inner" "$n/initrd.img"
  cp "$KERNEL" "$n/kernel"
  # QEMU, its libraries at their paths, and the firmware a -kernel boot of
  # the pc machine reads (passed with -L).
  # QEMU loads TCG itself as a module (accel-tcg-x86_64.so).
  qemu=$(command -v qemu-system-x86_64)
  qmods=$(dirname "$(ldd "$qemu" | awk '$1 ~ /^libglib/ { print $3 }')")/qemu
  [ -f "$qmods/accel-tcg-x86_64.so" ] || fail "no $qmods/accel-tcg-x86_64.so (QEMU's TCG module)"
  mkdir -p "$outer$(dirname "$qemu")" "$n/qemu-modules"
  cp "$qemu" "$outer$qemu"
  cp "$qmods/accel-tcg-x86_64.so" "$n/qemu-modules/"
  ldd "$qemu" "$qmods/accel-tcg-x86_64.so" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\/.*[^:]$/ && NF > 1 { print $1 }' | sort -u | while read -r lib; do
    mkdir -p "$outer$(dirname "$lib")"
    cp -L "$lib" "$outer$lib"
  done
  for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/kvmvapic.bin /usr/share/qemu/pvh.bin; do
    cp -L "$f" "$n/firmware/"
  done
  {
    echo "export TPMMUX_VSOCK_NESTED_QEMU=$qemu"
    echo "export TPMMUX_VSOCK_NESTED_DIR=/vmtest/nested"
    echo "export QEMU_MODULE_DIR=/vmtest/nested/qemu-modules"
  } >>"$outer/vmtest/env"
  echo "nested /src/internal/agent agent.test ^TestNestedVsockBridge\$" >>"$outer/vmtest/plan"
fi
pack "$outer" "$work/initrd.img"
t_pack=$(e2e_now)
e2e_log "initramfs $(($(stat -c %s "$work/initrd.img") >> 20)) MiB; kernel $KERNEL_PKG"

# ---- boot ---------------------------------------------------------------------------
mem=512
[ -n "$nested" ] && mem=2048
results=$work/results.log
: >"$results"
# shellcheck disable=SC2054 # commas are QEMU's
qemu_args=(
  -accel "${TPMMUX_VMTEST_ACCEL:-tcg}" -m "$mem" -smp "$smp" -cpu max
  -nodefaults -no-user-config -display none -no-reboot
  -kernel "$KERNEL" -initrd "$work/initrd.img" -append "console=ttyS0 panic=-1 quiet"
  -chardev "file,id=con0,path=$work/console.log" -serial chardev:con0
  -device virtio-serial-pci,id=vser0
  -chardev "file,id=res0,path=$results"
  -device virtserialport,bus=vser0.0,chardev=res0,name=org.tpmmux.vmtest
)
printf '%q ' qemu-system-x86_64 "${qemu_args[@]}" >"$work/qemu.cmd"
t_qemu=$(e2e_now)
qemu-system-x86_64 "${qemu_args[@]}" 2>"$work/qemu.log" &
qpid=$!
e2e_log "QEMU pid $qpid, console $work/console.log, results $results"
deadline=$(($(date +%s) + timeout))
while kill -0 "$qpid" 2>/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the guest did not finish within ${timeout}s"
  sleep 0.5
done
wait "$qpid" || fail "QEMU exited $?"
qpid=''
t_end=$(e2e_now)

# ---- verdict -----------------------------------------------------------------------
tr -d '\r' <"$results" >"$work/results.txt"
grep -q '^VMTEST-DONE' "$work/results.txt" || fail "the guest did not finish its plan (see $results)"
bad=''
while read -r name _; do
  rc=$(sed -n "s/^VMTEST-RESULT $name //p" "$work/results.txt")
  [ "$rc" = 0 ] || { e2e_log "$name: exit status ${rc:-missing}"; bad=1; }
done <"$outer/vmtest/plan"
if grep -q '^testing: warning: no tests to run' "$work/results.txt"; then
  e2e_log "a test binary matched no test (a renamed test? see the plan in $outer/vmtest/plan)"
  bad=1
fi
# Test results of top-level tests and subtests, as go test -v prints them.
ran=$(grep -cE '^--- PASS: ' "$work/results.txt" || true)
skipped=$(grep -cE '^ *--- SKIP: ' "$work/results.txt" || true)
failed=$(grep -cE '^ *--- FAIL: ' "$work/results.txt" || true)
nested_ran=$(grep -cE '^--- PASS: TestNested' "$work/results.txt" || true)
if [ -n "$bad" ] || [ "$failed" != 0 ] || [ "$skipped" != 0 ] || [ "$ran" = 0 ]; then
  grep -E '^ *--- (FAIL|SKIP)|^VMTEST-RESULT|^(FAIL|panic)' "$work/results.txt" | sed 's/^/    /' >&2 || true
  e2e_log "guest output: $results"
  fail "$ran vsock tests passed, $failed failed, $skipped skipped (none may fail or skip)"
fi
grep -E '^--- PASS: ' "$work/results.txt" | sed 's/^/    /' >&2
ok=1
printf 'vmtest timings: kernel+modules %ss, go test -c %ss, initramfs %ss, guest %ss, total %ss\n' \
  "$(e2e_elapsed "$t0" "$t_kernel")" "$(e2e_elapsed "$t_kernel" "$t_build")" "$(e2e_elapsed "$t_build" "$t_pack")" \
  "$(e2e_elapsed "$t_qemu" "$t_end")" "$(e2e_elapsed "$t0" "$t_end")"
echo "vmtest: $ran vsock tests ran in a QEMU guest on a real AF_VSOCK stack ($nested_ran of them with a nested vhost-vsock guest), 0 skipped, 0 failed"
