#!/usr/bin/env bash
# Installs tpmmux on a libvirt host: the binaries, the libvirt hook, default
# configuration files (never overwriting existing ones unless asked) and the
# systemd unit. Run as root. (A Debian package is an alternative:
# scripts/package.sh.)
#
#   scripts/install.sh [--prefix DIR] [--from BINDIR] [--no-systemd]
#                      [--control PATH] [--hook-timeout DUR] [--serial-dir DIR]
#                      [--fail-open]
#   scripts/install.sh --uninstall [--prefix DIR] [--purge]
#
#   --prefix DIR        install binaries into DIR/bin (default /usr/local)
#   --from BINDIR       use binaries already built there (tpmmux-bridge,
#                       tpmmux-hook, tpmmux-verify, tpmmux-agent); default:
#                       build them with go, statically (CGO_ENABLED=0)
#   --no-systemd        do not install the unit (hosts without systemd, tests)
#   --control PATH      the bridge's control socket the hook talks to; writes
#                       /etc/tpmmux/hook.json even if it exists
#   --hook-timeout DUR  the hook's timeout (default 2s)
#   --serial-dir DIR    the bridge's serial_dir, where the hook leaves
#                       placeholder sockets (default /run/tpmmux/serial)
#   --fail-open         write "fail_open": true into hook.json: domains start
#                       unattested while the bridge is down
#   --uninstall         remove what an install put in place: the binaries,
#                       the hook, the unit and the guest files; keeps
#                       /etc/tpmmux and /var/lib/tpmmux (the log and the VMs'
#                       keys) unless --purge
#
# Afterwards, on a systemd host: `systemctl enable --now tpmmux-bridge`, then
# restart libvirtd once so it sees /etc/libvirt/hooks/qemu.d (docs/hook.md).
# The static guest agent and its unit are put in PREFIX/share/tpmmux/guest/
# for VM images.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local from='' systemd=1 control='' timeout=2s serialdir=/run/tpmmux/serial
writehook='' failopen=false uninstall='' purge=''
while (($#)); do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --no-systemd) systemd=''; shift ;;
    --control) control=$2; writehook=1; shift 2 ;;
    --hook-timeout) timeout=$2; writehook=1; shift 2 ;;
    --serial-dir) serialdir=$2; writehook=1; shift 2 ;;
    --fail-open) failopen=true; writehook=1; shift ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -z "$purge" ] || [ -n "$uninstall" ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 2; }

# systemd_pid1 says whether systemd runs this host (PID 1), so that
# systemctl can start the bridge.
systemd_pid1() { [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
UNIT=/etc/systemd/system/tpmmux-bridge.service

if [ -n "$uninstall" ]; then
  if [ -e "$UNIT" ] && systemd_pid1; then
    systemctl disable --now tpmmux-bridge.service >/dev/null 2>&1 || true
  fi
  rm -f "$UNIT"
  systemd_pid1 && systemctl daemon-reload || true
  rm -f /etc/libvirt/hooks/qemu.d/tpmmux
  for b in tpmmux-bridge tpmmux-hook tpmmux-verify; do rm -f "$prefix/bin/$b"; done
  rm -rf "$prefix/share/tpmmux"
  if [ -n "$purge" ]; then
    rm -rf /etc/tpmmux /var/lib/tpmmux /run/tpmmux
    echo "uninstalled and purged: binaries, hook, unit, /etc/tpmmux, /var/lib/tpmmux"
  else
    echo "uninstalled: binaries, hook, unit; kept /etc/tpmmux and /var/lib/tpmmux (--uninstall --purge removes them)"
  fi
  if pgrep -x libvirtd >/dev/null || pgrep -x virtqemud >/dev/null; then
    echo "libvirtd runs no tpmmux hook any more; running domains are not affected"
  fi
  exit 0
fi

if [ -z "$from" ]; then
  command -v go >/dev/null || { echo "install.sh: Go 1.26 is needed to build (https://go.dev/dl), or give --from BINDIR" >&2; exit 1; }
  from=$(mktemp -d)
  trap 'rm -rf "$from"' EXIT
  (cd "$ROOT" && CGO_ENABLED=0 go build -o "$from/" ./cmd/tpmmux-bridge ./cmd/tpmmux-hook ./cmd/tpmmux-verify ./cmd/tpmmux-agent)
fi
for b in tpmmux-bridge tpmmux-hook tpmmux-verify tpmmux-agent; do
  [ -x "$from/$b" ] || { echo "install.sh: $from/$b missing" >&2; exit 1; }
done

install -d -m 0755 "$prefix/bin" "$prefix/share/tpmmux/guest" /etc/libvirt/hooks/qemu.d
install -d -m 0755 /etc/tpmmux
for b in tpmmux-bridge tpmmux-hook tpmmux-verify; do install -m 0755 "$from/$b" "$prefix/bin/$b"; done
install -m 0755 "$from/tpmmux-agent" "$prefix/share/tpmmux/guest/tpmmux-agent"
install -m 0644 "$ROOT/scripts/systemd/tpmmux-agent.service" "$prefix/share/tpmmux/guest/"

if [ -n "$writehook" ] || [ ! -e /etc/tpmmux/hook.json ]; then
  printf '{\n  "control_socket": "%s",\n  "timeout": "%s",\n  "fail_open": %s,\n  "mode": "opt-out",\n  "serial_dir": "%s"\n}\n' \
    "${control:-/run/tpmmux/control.sock}" "$timeout" "$failopen" "$serialdir" >/etc/tpmmux/hook.json
fi
[ -e /etc/tpmmux/bridge.json ] || install -m 0644 "$ROOT/scripts/etc/bridge.json" /etc/tpmmux/bridge.json

# Before the hook goes in: a fail-closed hook refuses every domain start
# while the bridge does not answer, from the next libvirtd restart on.
if ! grep -q '"fail_open": *true' /etc/tpmmux/hook.json; then
  ctl=$(sed -n 's/.*"control_socket": *"\([^"]*\)".*/\1/p' /etc/tpmmux/hook.json)
  if "$prefix/bin/tpmmux-bridge" status --control "${ctl:-/run/tpmmux/control.sock}" --timeout 2s >/dev/null 2>&1; then
    : # a bridge answers
  elif grep -q '"tpm": *"device"' /etc/tpmmux/bridge.json && [ ! -e /dev/tpmrm0 ]; then
    cat >&2 <<EOF
install.sh: WARNING: this host has no /dev/tpmrm0, and /etc/tpmmux/bridge.json says "tpm": "device":
  the bridge cannot start, and the fail-closed hook will refuse EVERY domain start once libvirtd
  restarts. Use swtpm (scripts/systemd/tpmmux-swtpm.service, then "tpm":
  "swtpm:unix:/run/tpmmux-swtpm/tpm.sock" in bridge.json), or rerun with --fail-open.
EOF
  else
    cat >&2 <<EOF
install.sh: note: no bridge answers on ${ctl:-/run/tpmmux/control.sock} yet. The hook is fail-closed: start the
  bridge (below) BEFORE libvirtd restarts, or every domain start is refused until it runs.
EOF
  fi
fi

# The hook: libvirt (>= 6.5) runs every executable in qemu.d.
install -m 0755 "$from/tpmmux-hook" /etc/libvirt/hooks/qemu.d/tpmmux

if [ -n "$systemd" ]; then
  sed "s|/usr/local/bin/|$prefix/bin/|" "$ROOT/scripts/systemd/tpmmux-bridge.service" >"$UNIT"
  chmod 0644 "$UNIT"
  if systemd_pid1; then systemctl daemon-reload; fi
fi

echo "installed: $prefix/bin/{tpmmux-bridge,tpmmux-hook,tpmmux-verify}, /etc/libvirt/hooks/qemu.d/tpmmux, /etc/tpmmux/*.json${systemd:+, tpmmux-bridge.service}"
if [ -n "$systemd" ] && systemd_pid1; then
  echo "next: systemctl enable --now tpmmux-bridge && systemctl restart libvirtd (once, for the hooks folder)"
elif [ -n "$systemd" ]; then
  echo "systemd is not PID 1 on this host (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): the unit cannot run here."
  echo "next: start the bridge under your init or supervisor, as root:"
  echo "  $prefix/bin/tpmmux-bridge run --config /etc/tpmmux/bridge.json"
  echo "then restart libvirtd once (for the hooks folder), after the bridge answers: $prefix/bin/tpmmux-bridge status"
fi
