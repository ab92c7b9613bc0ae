#!/usr/bin/env bash
# Runs a libvirtd (with its virtlogd) for tpmmux's libvirt/ and qemu/ tests
# on a machine without a running systemd, as root.
#
#   scripts/libvirtd.sh start    install what is missing, start virtlogd and
#                                libvirtd, wait until virsh answers
#   scripts/libvirtd.sh stop     stop the daemons this script started (by PID)
#   scripts/libvirtd.sh status   exit 0 when libvirtd answers, 3 when not
#
# Idempotent: start when already running only checks that libvirtd answers;
# stop when nothing runs does nothing. A libvirtd that this script did not
# start (e.g. one run by systemd) is used as it is and never stopped.
#
# Environment:
#   TPMMUX_LIBVIRT_STATE  state dir for PID files and logs (/run/tpmmux-test)
#   TPMMUX_LIBVIRT_WAIT   seconds to wait for libvirtd to answer (60)
set -euo pipefail

state=${TPMMUX_LIBVIRT_STATE:-/run/tpmmux-test}
wait_s=${TPMMUX_LIBVIRT_WAIT:-60}
uri=qemu:///system
sock=/var/run/libvirt/libvirt-sock
pkgs=(libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 libvirt-clients)

log() { echo "libvirtd.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (libvirtd runs qemu:///system)"

# pid_alive FILE NAME: the PID in FILE is a running process called NAME.
pid_alive() {
  local f=$1 name=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

# other_libvirtd: a libvirtd runs in this mount namespace (one in another,
# like scripts/e2e/twohost.sh's host B, has its own sockets and is no
# obstacle).
other_libvirtd() {
  local p me
  me=$(readlink /proc/self/ns/mnt)
  for p in $(pgrep -x libvirtd); do
    [ "$(readlink "/proc/$p/ns/mnt" 2>/dev/null)" = "$me" ] && return 0
  done
  return 1
}

# answers: libvirtd accepts a connection and lists domains.
answers() {
  command -v virsh >/dev/null || return 1
  [ -S "$sock" ] || return 1
  timeout 30 virsh -c "$uri" list >/dev/null 2>&1
}

install_missing() {
  local missing=() p created_policy=0
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  # Keep the packages' maintainer scripts from starting the daemons
  # themselves (through init.d without systemd): this script starts them
  # and must own their PIDs.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  local rc=0
  apt-get update -qq || rc=$?
  if [ "$rc" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  fi
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get failed (exit $rc)"
}

# configure_qemu: run QEMU as root (no systemd-logind/udev here, and the
# test domains use files under root-owned temporary directories).
configure_qemu() {
  local conf=/etc/libvirt/qemu.conf
  [ -f "$conf" ] || die "$conf missing after install"
  grep -q '^user = "root"' "$conf" || echo 'user = "root"' >>"$conf"
  grep -q '^group = "root"' "$conf" || echo 'group = "root"' >>"$conf"
}

start() {
  install_missing
  configure_qemu
  mkdir -p "$state" /var/run/libvirt
  if answers; then
    log "libvirtd already answers on $sock"
    return 0
  fi
  if ! pid_alive "$state/virtlogd.pid" virtlogd; then
    rm -f "$state/virtlogd.pid"
    LIBVIRT_LOG_OUTPUTS="3:file:$state/virtlogd.log" virtlogd -d -p "$state/virtlogd.pid"
  fi
  if ! pid_alive "$state/libvirtd.pid" libvirtd; then
    if other_libvirtd; then
      die "a libvirtd this script did not start is running but does not answer; see its logs"
    fi
    rm -f "$state/libvirtd.pid"
    # Warnings and errors go to $state/libvirtd.log (no journald here).
    LIBVIRT_LOG_OUTPUTS="3:file:$state/libvirtd.log" libvirtd -d -p "$state/libvirtd.pid"
  fi
  # The first call can take several seconds while libvirtd probes QEMU's
  # capabilities (about 8 s measured with QEMU 7.2 under TCG).
  local deadline=$((SECONDS + wait_s))
  until answers; do
    if ! pid_alive "$state/libvirtd.pid" libvirtd; then
      tail -n 20 "$state/libvirtd.log" >&2 || true
      die "libvirtd exited during start"
    fi
    ((SECONDS < deadline)) || die "libvirtd did not answer within ${wait_s}s"
    sleep 0.5
  done
  log "libvirtd answers (pid $(cat "$state/libvirtd.pid"), virtlogd pid $(cat "$state/virtlogd.pid"))"
}

# stop_one NAME: SIGTERM the daemon in $state/NAME.pid, wait, then SIGKILL.
stop_one() {
  local name=$1 f="$state/$1.pid" pid i
  if ! pid_alive "$f" "$name"; then
    rm -f "$f"
    return 0
  fi
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then
    log "$name (pid $pid) ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
  log "stopped $name (pid $pid)"
}

stop() {
  stop_one libvirtd
  stop_one virtlogd
}

status() {
  if answers; then
    local who="not started by this script"
    pid_alive "$state/libvirtd.pid" libvirtd && who="pid $(cat "$state/libvirtd.pid")"
    echo "libvirtd: running ($who)"
    return 0
  fi
  echo "libvirtd: not answering on $sock"
  return 3
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
