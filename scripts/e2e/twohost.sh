#!/usr/bin/env bash
# A second libvirt host on this machine, for the live-migration test
# (scripts/e2e-migrate.sh): its own libvirtd and virtlogd, swtpm (its host
# TPM) and tpmmux bridge, in their own mount and UTS namespaces. Inside them
# /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
# /var/log/libvirt, /etc/tpmmux, /run/tpmmux and /var/lib/tpmmux are host
# B's own directories (bind mounts of $DIR/... and $RUNB/...), the hostname
# is $HOSTB and libvirtd.conf sets its own host_uuid: libvirt refuses to
# migrate a domain to a host with the same host UUID or hostname. The network
# namespace is shared, so the migration stream goes over TCP on localhost.
# Host B's hook is the tpmmux hook in its /etc/libvirt/hooks/qemu.d.
#
#   twohost.sh start            namespaces, virtlogd, libvirtd (idempotent)
#   twohost.sh swtpm            start B's swtpm (host TPM) unless it runs
#   twohost.sh bridge [ARGS]    start B's bridge (tpmmux-bridge run ARGS) with
#                               B's default paths; waits for its control socket
#   twohost.sh bridge-stop [--kill]  stop B's bridge (SIGTERM, or SIGKILL)
#   twohost.sh stop             destroy B's domains, stop its bridge, swtpm,
#                               libvirtd, virtlogd and every process left in its
#                               namespace (by PID); remove what start created
#   twohost.sh status           exit 0 when B's libvirtd answers
#   twohost.sh exec CMD...      run CMD inside B's namespaces
#   twohost.sh uri              the libvirt URI of B's libvirtd, from outside
#
# stop is safe to call any time (also when nothing runs), and start cleans up
# after itself when it fails. Every process is stopped by the PID it was
# started with, or found by its mount namespace (QEMU started by B's libvirtd).
#
# Environment:
#   TPMMUX_HOSTB_DIR       B's persistent dirs (default /var/lib/tpmmux-e2e/hostb)
#   TPMMUX_HOSTB_RUN       B's run dirs, PID files (default /run/tpmmux-e2e-hostb)
#   TPMMUX_HOSTB_HOSTNAME  B's hostname (default hostb.tpmmux-e2e)
#   TPMMUX_HOSTB_BIN       where tpmmux-bridge and tpmmux-hook are (for swtpm/bridge/start)
#   TPMMUX_HOSTB_WAIT      seconds to wait for libvirtd (default 90)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SELF=$ROOT/scripts/e2e/twohost.sh
DIR=${TPMMUX_HOSTB_DIR:-/var/lib/tpmmux-e2e/hostb}
RUNB=${TPMMUX_HOSTB_RUN:-/run/tpmmux-e2e-hostb}
HOSTB=${TPMMUX_HOSTB_HOSTNAME:-hostb.tpmmux-e2e}
BIN=${TPMMUX_HOSTB_BIN:-}
WAIT_S=${TPMMUX_HOSTB_WAIT:-90}
PIDS=$RUNB/pids
SOCK=$RUNB/libvirt/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"
# inside B's namespaces -> the directory mounted there (outside it)
MOUNTS=(
  "/etc/libvirt:$DIR/etc-libvirt"
  "/var/lib/libvirt:$DIR/var-lib-libvirt"
  "/var/cache/libvirt:$DIR/var-cache-libvirt"
  "/var/log/libvirt:$DIR/var-log-libvirt"
  "/etc/tpmmux:$DIR/etc-tpmmux"
  "/var/lib/tpmmux:$DIR/var-lib-tpmmux"
  "/run/libvirt:$RUNB/libvirt"
  "/run/tpmmux:$RUNB/tpmmux"
)

log() { echo "twohost.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

# alive NAME: the PID in $PIDS/NAME.pid runs.
alive() { [ -s "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
holder() { cat "$PIDS/ns.pid"; }
inb() { nsenter -t "$(holder)" -m -u -- "$@"; }
answers() { [ -S "$SOCK" ] && timeout 30 virsh -c "$URI" list >/dev/null 2>&1; }

# ns_init: run by unshare inside the new namespaces: mount B's directories,
# set the hostname, say ready, then hold the namespaces open.
ns_init() {
  local m
  mount --make-rprivate /
  for m in "${MOUNTS[@]}"; do mount --bind "${m#*:}" "${m%%:*}"; done
  hostname "$HOSTB"
  : >"$PIDS/ns.ready"
  exec sleep infinity
}

# make_config: B's /etc/libvirt is a copy of this host's (qemu.conf runs
# QEMU as root) with its own host_uuid, plus the tpmmux hook.
make_config() {
  local uuid
  if [ ! -s "$DIR/host-uuid" ]; then cat /proc/sys/kernel/random/uuid >"$DIR/host-uuid"; fi
  uuid=$(cat "$DIR/host-uuid")
  rm -rf "$DIR/etc-libvirt"
  cp -a /etc/libvirt "$DIR/etc-libvirt"
  rm -rf "$DIR/etc-libvirt/hooks" "$DIR/etc-libvirt/qemu/networks/autostart" "$DIR/etc-libvirt/qemu/"*.xml
  grep -v '^host_uuid' /etc/libvirt/libvirtd.conf >"$DIR/etc-libvirt/libvirtd.conf" || true
  printf 'host_uuid = "%s"\n' "$uuid" >>"$DIR/etc-libvirt/libvirtd.conf"
  mkdir -p "$DIR/etc-libvirt/hooks/qemu.d"
  if [ -n "$BIN" ] && [ -x "$BIN/tpmmux-hook" ]; then
    install -m 0755 "$BIN/tpmmux-hook" "$DIR/etc-libvirt/hooks/qemu.d/tpmmux"
  fi
  # QEMU's capabilities probe takes seconds: start from this host's cache.
  if [ -d /var/cache/libvirt/qemu ] && [ ! -d "$DIR/var-cache-libvirt/qemu" ]; then
    cp -a /var/cache/libvirt/qemu "$DIR/var-cache-libvirt/" 2>/dev/null || true
  fi
}

start() {
  local m t
  mkdir -p "$PIDS"
  if alive ns && alive libvirtd && answers; then
    log "host B ($HOSTB) answers at $URI"
    return 0
  fi
  trap 'stop >/dev/null 2>&1 || true' ERR
  for m in "${MOUNTS[@]}"; do mkdir -p "${m#*:}"; done
  make_config
  # Mount points that do not exist on this host are made for the run and
  # removed by stop (only if still empty).
  for m in "${MOUNTS[@]}"; do
    t=${m%%:*}
    if [ ! -d "$t" ]; then mkdir -p "$t" && echo "$t" >>"$PIDS/made-dirs"; fi
  done
  if ! alive ns; then
    rm -f "$PIDS/ns.ready"
    unshare --mount --uts --propagation private -- "$SELF" _ns-init </dev/null >"$RUNB/ns.log" 2>&1 &
    echo $! >"$PIDS/ns.pid"
    for _ in $(seq 1 50); do [ -e "$PIDS/ns.ready" ] && break; sleep 0.1; done
    [ -e "$PIDS/ns.ready" ] || die "the namespace holder did not come up: $(cat "$RUNB/ns.log")"
  fi
  [ "$(inb hostname)" = "$HOSTB" ] || die "hostname in B's namespace is not $HOSTB"
  if ! alive virtlogd; then
    inb env LIBVIRT_LOG_OUTPUTS="3:file:$RUNB/virtlogd.log" virtlogd -d -p "$PIDS/virtlogd.pid"
  fi
  if ! alive libvirtd; then
    inb env LIBVIRT_LOG_OUTPUTS="3:file:$RUNB/libvirtd.log" libvirtd -d -p "$PIDS/libvirtd.pid"
  fi
  local deadline=$((SECONDS + WAIT_S))
  until answers; do
    alive libvirtd || { tail -n 20 "$RUNB/libvirtd.log" >&2 || true; die "B's libvirtd exited during start"; }
    ((SECONDS < deadline)) || die "B's libvirtd did not answer within ${WAIT_S}s"
    sleep 0.5
  done
  trap - ERR
  log "host B ($HOSTB, host_uuid $(cat "$DIR/host-uuid")) answers at $URI (libvirtd pid $(cat "$PIDS/libvirtd.pid"))"
}

# start_swtpm: B's host TPM, on a loopback port written to $RUNB/swtpm.port.
start_swtpm() {
  alive swtpm && return 0
  local port=$((20000 + RANDOM % 20000))
  mkdir -p "$DIR/swtpm"
  inb swtpm socket --tpm2 --tpmstate dir="$DIR/swtpm" \
    --server type=tcp,port=$port,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((port + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear --pid file="$PIDS/swtpm.pid" --daemon >"$RUNB/swtpm.log" 2>&1 ||
    die "swtpm did not start: $(cat "$RUNB/swtpm.log")"
  echo "$port" >"$RUNB/swtpm.port"
  for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
  die "swtpm on port $port does not answer"
}

# start_bridge ARGS: B's bridge in B's namespaces: /etc/tpmmux/bridge.json,
# /var/lib/tpmmux, /run/tpmmux/control.sock there are B's own.
start_bridge() {
  [ -n "$BIN" ] || die "TPMMUX_HOSTB_BIN is not set"
  alive bridge && die "B's bridge runs already (pid $(cat "$PIDS/bridge.pid"))"
  [ -s "$RUNB/swtpm.port" ] || die "start B's swtpm first"
  # exec: the PID is the bridge's own (nsenter execs it), not a subshell's.
  (exec nsenter -t "$(holder)" -m -u -- "$BIN/tpmmux-bridge" run --tpm "swtpm:127.0.0.1:$(cat "$RUNB/swtpm.port")" \
    --serial-group root --libvirt /run/libvirt/libvirt-sock --host "$HOSTB" "$@" </dev/null >>"$RUNB/bridge.log" 2>&1) &
  echo $! >"$PIDS/bridge.pid"
  for _ in $(seq 1 100); do
    if "$BIN/tpmmux-bridge" status --control "$RUNB/tpmmux/control.sock" >/dev/null 2>&1; then return 0; fi
    alive bridge || { tail -n 20 "$RUNB/bridge.log" >&2; die "B's bridge exited"; }
    sleep 0.2
  done
  die "B's bridge does not answer on $RUNB/tpmmux/control.sock"
}

# stop_pid NAME [SIGNAL]: signal the process in $PIDS/NAME.pid (TERM by
# default), wait up to 10 s, then KILL.
stop_pid() {
  local name=$1 sig=${2:-TERM} pid
  [ -s "$PIDS/$name.pid" ] || return 0
  pid=$(cat "$PIDS/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$PIDS/$name.pid"
}

# ns_pids: the processes in B's mount namespace but the holder.
ns_pids() {
  local h ns p
  h=$(holder 2>/dev/null) || return 0
  ns=$(readlink "/proc/$h/ns/mnt" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$h" ] && continue
    [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$ns" ] && echo "$p"
  done
  return 0
}

stop() {
  local d p left
  if alive libvirtd && answers; then
    for d in $(virsh -c "$URI" list --name 2>/dev/null); do virsh -c "$URI" -q destroy "$d" >/dev/null 2>&1 || true; done
    for d in $(virsh -c "$URI" list --all --name 2>/dev/null); do virsh -c "$URI" -q undefine "$d" >/dev/null 2>&1 || true; done
  fi
  stop_pid bridge
  stop_pid swtpm
  stop_pid libvirtd
  stop_pid virtlogd
  # Anything else in B's namespace (a QEMU libvirtd left behind): by PID.
  left=$(ns_pids)
  if [ -n "$left" ]; then
    log "stopping what is left in B's namespace: $(for p in $left; do printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)"
    for p in $left; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in $(ns_pids); do kill -KILL "$p" 2>/dev/null || true; done
  fi
  stop_pid ns
  rm -f "$PIDS/ns.ready"
  if [ -s "$PIDS/made-dirs" ]; then
    while read -r d; do rmdir "$d" 2>/dev/null || true; done <"$PIDS/made-dirs"
    rm -f "$PIDS/made-dirs"
  fi
  rm -rf "$RUNB" "$DIR"
}

case "${1:-}" in
  start) start ;;
  swtpm) start_swtpm ;;
  bridge) shift; start_bridge "$@" ;;
  bridge-stop) if [ "${2:-}" = --kill ]; then stop_pid bridge KILL; else stop_pid bridge; fi ;;
  stop) stop ;;
  status) alive libvirtd && answers ;;
  exec) shift; inb "$@" ;;
  uri) echo "$URI" ;;
  _ns-init) ns_init ;;
  *) echo "usage: $0 start|swtpm|bridge [ARGS]|bridge-stop [--kill]|stop|status|exec CMD...|uri" >&2; exit 2 ;;
esac
