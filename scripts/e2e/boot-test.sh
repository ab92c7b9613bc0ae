#!/usr/bin/env bash
# Boots one e2e guest (build-guest.sh) directly under QEMU (TCG, no libvirt)
# with a virtio-serial port whose chardev connects (client mode) to a unix
# socket that e2etool listens on, and checks what the guest sent.
#
#   boot-test.sh [--name NAME] [--out DIR] [--keep] [--timeout SEC]
#                [--init-payload FILE] [--poweroff] [--vmlinuz] [--gzip] [--vsock]
#
#   --name NAME          guest name (default e2e-a)
#   --out DIR            work dir (default: a new /tmp/tpmmux-e2e.XXXXXX,
#                        removed on success unless --keep)
#   --timeout SEC        limit for each wait (default 120)
#   --init-payload FILE  boot with this agent instead of the stand-in; the test
#                        then only checks that /init started it and reports
#                        the bytes that reached the socket
#   --poweroff           let the guest power itself off (ACPI) when done (with
#                        --init-payload: when the agent exits) and check that
#                        QEMU exits 0, instead of killing QEMU
#   --vmlinuz, --gzip, --vsock  passed to build-guest.sh
#
# With the stand-in (default) it checks: the console markers; the bytes on
# the socket parse completely as a binary IMA list (internal/ima.ParseList);
# the entry count and byte count equal what the guest counted; the guest
# got the host's ACK; the list is ima-ng/sha256 starting with
# boot_aggregate; the guest-specific paths are there; the digests of
# /bin/busybox and /opt/NAME/bin/tool-1 equal the host's sha256 of the same
# files. Exit 0 on success, 1 on failure. QEMU and the listener are killed
# by PID.
#
# Environment: TPMMUX_E2E_ACCEL (default tcg), TPMMUX_E2E_QEMU_ARGS (extra
# QEMU arguments, split on spaces), and those of build-guest.sh.
set -euo pipefail
E2E_PROG=boot-test.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() { sed -n '/^#   boot-test.sh/,/^#   --vmlinuz, --gzip, --vsock/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

name=e2e-a work='' keep='' timeout=120 payload='' poweroff='' build_opts=()
while (($#)); do
  case "$1" in
    --name) name=${2:?}; shift 2 ;;
    --out) work=${2:?}; shift 2 ;;
    --keep) keep=1; shift ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --init-payload) payload=${2:?}; shift 2 ;;
    --poweroff) poweroff=1; shift ;;
    --vmlinuz | --gzip | --vsock) build_opts+=("$1"); shift ;;
    -h | --help) usage ;;
    *) e2e_log "unknown argument $1"; usage ;;
  esac
done

t0=$(e2e_now)
if [ -n "$work" ]; then mkdir -p "$work"; else work=$(mktemp -d /tmp/tpmmux-e2e.XXXXXX); fi
work=$(cd "$work" && pwd)
qpid='' lpid='' ok=''
cleanup() {
  local p
  for p in $qpid $lpid; do
    if kill -0 "$p" 2>/dev/null; then
      kill "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
  done
  if [ -n "$ok" ] && [ -z "$keep" ]; then rm -rf "$work"; else e2e_log "work dir kept: $work"; fi
}
trap cleanup EXIT
fail() {
  e2e_log "FAIL: $*"
  if [ -f "$work/console.log" ]; then
    e2e_log "console (last 40 lines):"
    tail -n 40 "$work/console.log" | sed 's/^/    /' >&2
  fi
  if [ -s "$work/qemu.log" ]; then
    e2e_log "QEMU stderr:"
    tail -n 20 "$work/qemu.log" | sed 's/^/    /' >&2
  fi
  exit 1
}

# wait_for DESC SEC CMD...: poll CMD every 0.1 s until it succeeds; fail
# after SEC seconds or as soon as QEMU has exited (when it should be running).
wait_for() {
  local desc=$1 sec=$2 deadline
  shift 2
  deadline=$(($(date +%s%N) + sec * 1000000000))
  until "$@"; do
    if [ -n "$qpid" ] && ! kill -0 "$qpid" 2>/dev/null; then
      "$@" && return 0
      fail "QEMU exited while waiting for $desc"
    fi
    [ "$(date +%s%N)" -lt "$deadline" ] || fail "timed out after ${sec}s waiting for $desc"
    sleep 0.1
  done
}
marker() { grep -q "^TPMMUX-E2E: $1" "$work/console.log" 2>/dev/null; }
marker_value() { sed -n "s/^TPMMUX-E2E: $1 //p" "$work/console.log" | tr -d '\r' | head -n1; }

# ---- build ---------------------------------------------------------------------
e2e_ensure_pkgs qemu-system-x86
payload_opt=()
[ -n "$payload" ] && payload_opt=(--init-payload "$payload")
"$here/build-guest.sh" "$work" --name "$name" "${payload_opt[@]}" "${build_opts[@]}" >/dev/null
# shellcheck disable=SC1091
. "$work/guest.env"
initrd_var=INITRD_$(echo "$name" | tr '.-' '__')
initrd=${!initrd_var}
t_build=$(e2e_now)
command -v go >/dev/null || e2e_die "go is required (e2etool)"
(cd "$repo" && go build -o "$work/e2etool" ./scripts/e2e/e2etool) || fail "go build e2etool"
t_tool=$(e2e_now)

# ---- host listener -----------------------------------------------------------------
sock=$work/port.sock
ack_opt=(-ack)
[ -n "$payload" ] && ack_opt=()
"$work/e2etool" listen -socket "$sock" -out "$work/received.bin" "${ack_opt[@]}" 2>"$work/listener.log" &
lpid=$!
wait_for "the listener socket" 10 test -S "$sock"

# ---- QEMU ------------------------------------------------------------------------------
append=$CMDLINE
[ -n "$poweroff" ] && append="$append tpmmux_e2e.poweroff"
# shellcheck disable=SC2054 # commas are QEMU's
qemu_args=(
  -accel "${TPMMUX_E2E_ACCEL:-tcg}" -m 256 -smp 1
  -nodefaults -no-user-config -display none -no-reboot
  -kernel "$KERNEL" -initrd "$initrd" -append "$append"
  -chardev "file,id=con0,path=$work/console.log" -serial chardev:con0
  -device virtio-serial-pci,id=vser0
  -chardev "socket,id=tpmmux0,path=$sock,reconnect=2"
  -device "virtserialport,bus=vser0.0,chardev=tpmmux0,name=$E2E_PORT_NAME"
)
# shellcheck disable=SC2206
[ -n "${TPMMUX_E2E_QEMU_ARGS:-}" ] && qemu_args+=($TPMMUX_E2E_QEMU_ARGS)
printf '%q ' qemu-system-x86_64 "${qemu_args[@]}" >"$work/qemu.cmd"
t_qemu=$(e2e_now)
qemu-system-x86_64 "${qemu_args[@]}" 2>"$work/qemu.log" &
qpid=$!
e2e_log "QEMU pid $qpid, console $work/console.log"

wait_for "TPMMUX-E2E: init start" "$timeout" marker "init start"
t_init=$(e2e_now)
wait_for "TPMMUX-E2E: init done" "$timeout" marker "init done"
t_done=$(e2e_now)
marker "init done (failed)" && fail "the guest's init failed"
marker "ima policy loaded" || fail "the guest could not load its IMA policy"
marker "warning: insmod" && fail "a module did not load: $(marker_value 'warning: insmod')"
port=$(marker_value "port $E2E_PORT_NAME is")
e2e_log "guest port: ${port:-?}"

# ---- checks -------------------------------------------------------------------------------
if [ -n "$payload" ]; then
  marker "starting /sbin/tpmmux-agent" || fail "init did not start the agent"
  if [ -n "$poweroff" ]; then
    wait_for "the agent to exit and the guest to power off" "$timeout" marker "poweroff"
  fi
  e2e_log "agent started${poweroff:+ and exited with $(marker_value 'agent exited')}; $(stat -c %s "$work/received.bin") bytes reached the socket"
else
  entries=$(marker_value "ima entries")
  bytes=$(marker_value "ima bytes")
  [ -n "$entries" ] && [ -n "$bytes" ] || fail "no ima entries/bytes markers"
  marker "host ack $entries $bytes" || fail "the guest did not get the host's ACK ($(marker_value 'warning:'))"
  # The guest prints the ACK only after the listener wrote it, i.e. after it
  # had every byte; received.bin is written before the ACK is sent.
  [ "$(stat -c %s "$work/received.bin")" = "$bytes" ] || fail "received $(stat -c %s "$work/received.bin") bytes, guest sent $bytes"
  "$work/e2etool" dump "$work/received.bin" >"$work/entries.txt" 2>"$work/dump.err" ||
    fail "received bytes do not parse as an IMA list: $(cat "$work/dump.err")"
  got=$(sed -n 's/^entries //p' "$work/entries.txt")
  [ "$got" = "$entries" ] || fail "parsed $got entries, guest counted $entries"
  sed -n 2p "$work/entries.txt" | grep -q ' boot_aggregate$' || fail "entry 0 is not boot_aggregate"
  awk 'NR > 1 && ($3 != "ima-ng" || $4 !~ /^sha256:/) { bad = 1 } END { exit bad }' "$work/entries.txt" ||
    fail "not every entry is ima-ng with a sha256 digest"
  for p in /bin/busybox "/opt/$name/bin/tool-1" "/opt/$name/bin/tool-2" "/opt/$name/bin/tool-3" \
    "/opt/$name/bin/busybox-$name" "/opt/$name/etc/guest.conf"; do
    grep -q " $p\$" "$work/entries.txt" || fail "no entry for $p"
  done
  digest_of() { awk -v p="$1" '$NF == p { sub(/^sha256:/, "", $4); print $4; exit }' "$work/entries.txt"; }
  [ "$(digest_of /bin/busybox)" = "$(sha256sum </bin/busybox | cut -d' ' -f1)" ] ||
    fail "/bin/busybox digest differs from the host's"
  tool1=$({ gzip -dc <"$initrd" 2>/dev/null || cat "$initrd"; } |
    cpio -i --quiet --to-stdout "opt/$name/bin/tool-1" | sha256sum | cut -d' ' -f1)
  [ "$(digest_of "/opt/$name/bin/tool-1")" = "$tool1" ] || fail "/opt/$name/bin/tool-1 digest differs from the initramfs file"
  e2e_log "IMA list from the guest: $entries entries, $bytes bytes, parsed by internal/ima:"
  sed -n '2,$p' "$work/entries.txt" | awk '{ print "    " $1 " " $NF " " substr($4, 1, 23) "..." }' >&2
fi

if [ -n "$poweroff" ]; then
  wait_for "QEMU to exit after the guest's poweroff" "$timeout" bash -c "! kill -0 $qpid 2>/dev/null"
  if wait "$qpid"; then e2e_log "guest powered off, QEMU exited 0"; else fail "QEMU exited $? after poweroff"; fi
  qpid=
fi
t_end=$(e2e_now)
ok=1
e2e_log "PASS guest $name ($KERNEL_PKG, $(basename "$KERNEL"), initrd $(stat -c %s "$initrd") bytes)"
printf 'timings: build %ss, e2etool %ss, qemu start to init %ss, to init done %ss, total %ss\n' \
  "$(e2e_elapsed "$t0" "$t_build")" "$(e2e_elapsed "$t_build" "$t_tool")" \
  "$(e2e_elapsed "$t_qemu" "$t_init")" "$(e2e_elapsed "$t_qemu" "$t_done")" "$(e2e_elapsed "$t0" "$t_end")"
