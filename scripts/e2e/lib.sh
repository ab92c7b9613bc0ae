# shellcheck shell=bash
# Shared helpers of scripts/e2e/*.sh (sourced, not run).

# The kernel command line of every e2e guest. Callers put it in <cmdline> of
# a libvirt domain or in QEMU's -append. build-guest.sh also writes it to
# OUTDIR/cmdline.
# shellcheck disable=SC2034 # used by the scripts that source this file
E2E_CMDLINE='console=ttyS0 ima_policy=tcb ima_template=ima-ng ima_hash=sha256 panic=-1 quiet'

# The name of the guest's virtio-serial port (virtserialport name= in QEMU,
# <target type='virtio' name='...'/> in libvirt).
# shellcheck disable=SC2034
E2E_PORT_NAME=org.tpmmux.0

e2e_log() { echo "${E2E_PROG:-e2e}: $*" >&2; }
e2e_die() { e2e_log "error: $*"; exit 1; }

# e2e_now: seconds since the epoch with milliseconds, e.g. 1700000000.123
e2e_now() { date +%s.%3N; }
# e2e_elapsed START [END]: END-START in seconds with 2 decimals.
e2e_elapsed() { awk -v a="$1" -v b="${2:-$(e2e_now)}" 'BEGIN { printf "%.2f", b - a }'; }

# e2e_cache_dir: where the kernel cache lives. $TPMMUX_E2E_CACHE wins, then
# $XDG_CACHE_HOME/tpmmux-e2e, then /var/cache/tpmmux-e2e for root and
# ~/.cache/tpmmux-e2e for others.
e2e_cache_dir() {
  if [ -n "${TPMMUX_E2E_CACHE:-}" ]; then
    echo "$TPMMUX_E2E_CACHE"
  elif [ -n "${XDG_CACHE_HOME:-}" ]; then
    echo "$XDG_CACHE_HOME/tpmmux-e2e"
  elif [ "$(id -u)" = 0 ]; then
    echo /var/cache/tpmmux-e2e
  else
    echo "${HOME:?}/.cache/tpmmux-e2e"
  fi
}

_e2e_apt_updated=
# e2e_apt_update: apt-get update, at most once per run.
e2e_apt_update() {
  [ -n "$_e2e_apt_updated" ] && return 0
  e2e_log "apt-get update"
  $(_e2e_sudo) apt-get update -qq >/dev/null || e2e_die "apt-get update failed"
  _e2e_apt_updated=1
}

# e2e_try_apt_update: like e2e_apt_update but returns non-zero instead of
# exiting when apt-get update fails (e.g. offline).
e2e_try_apt_update() {
  [ -n "$_e2e_apt_updated" ] && return 0
  $(_e2e_sudo) apt-get update -qq >/dev/null 2>&1 || return 1
  _e2e_apt_updated=1
}

_e2e_sudo() { [ "$(id -u)" = 0 ] || echo sudo; }

# e2e_have_pkg PKG: PKG is installed.
e2e_have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# e2e_ensure_pkgs PKG...: apt-get install those of PKG... that are missing.
e2e_ensure_pkgs() {
  local p missing=()
  for p in "$@"; do e2e_have_pkg "$p" || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  e2e_apt_update
  e2e_log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $(_e2e_sudo) apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    e2e_die "apt-get install ${missing[*]} failed"
}
