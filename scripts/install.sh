#!/usr/bin/env bash
# Installs tpmmux on a libvirt host: the binaries, the libvirt hook, default
# configuration files (never overwriting existing ones unless asked) and the
# systemd unit. Run as root.
#
#   scripts/install.sh [--prefix DIR] [--from BINDIR] [--no-systemd]
#                      [--control PATH] [--hook-timeout DUR]
#
#   --prefix DIR        install binaries into DIR/bin (default /usr/local)
#   --from BINDIR       use binaries already built there (tpmmux-bridge,
#                       tpmmux-hook, tpmmux-verify, tpmmux-agent); default:
#                       build them with go (the agent statically)
#   --no-systemd        do not install the unit (hosts without systemd, tests)
#   --control PATH      the bridge's control socket the hook talks to; writes
#                       /etc/tpmmux/hook.json even if it exists
#   --hook-timeout DUR  the hook's timeout (default 2s)
#   --serial-dir DIR    the bridge's serial_dir, for the hook's placeholder
#                       sockets (default /run/tpmmux/serial)
#
# Afterwards, on a systemd host: `systemctl enable --now tpmmux-bridge`, then
# restart libvirtd once so it sees /etc/libvirt/hooks/qemu.d (docs/hook.md).
# The static guest agent and its unit are put in PREFIX/share/tpmmux/guest/
# for VM images.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local from='' systemd=1 control='' timeout=2s serialdir=/run/tpmmux/serial
while (($#)); do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    --no-systemd) systemd=''; shift ;;
    --control) control=$2; shift 2 ;;
    --hook-timeout) timeout=$2; shift 2 ;;
    --serial-dir) serialdir=$2; shift 2 ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

if [ -z "$from" ]; then
  bash "$ROOT/scripts/setup.sh" demo
  from=$(mktemp -d)
  trap 'rm -rf "$from"' EXIT
  (cd "$ROOT" && go build -o "$from/" ./cmd/tpmmux-bridge ./cmd/tpmmux-hook ./cmd/tpmmux-verify)
  (cd "$ROOT" && CGO_ENABLED=0 go build -o "$from/tpmmux-agent" ./cmd/tpmmux-agent)
fi
for b in tpmmux-bridge tpmmux-hook tpmmux-verify tpmmux-agent; do
  [ -x "$from/$b" ] || { echo "install.sh: $from/$b missing" >&2; exit 1; }
done

install -d -m 0755 "$prefix/bin" "$prefix/share/tpmmux/guest" /etc/libvirt/hooks/qemu.d
install -d -m 0755 /etc/tpmmux
for b in tpmmux-bridge tpmmux-hook tpmmux-verify; do install -m 0755 "$from/$b" "$prefix/bin/$b"; done
install -m 0755 "$from/tpmmux-agent" "$prefix/share/tpmmux/guest/tpmmux-agent"
install -m 0644 "$ROOT/scripts/systemd/tpmmux-agent.service" "$prefix/share/tpmmux/guest/"

# The hook: libvirt (>= 6.5) runs every executable in qemu.d.
install -m 0755 "$from/tpmmux-hook" /etc/libvirt/hooks/qemu.d/tpmmux

if [ -n "$control" ] || [ ! -e /etc/tpmmux/hook.json ]; then
  printf '{\n  "control_socket": "%s",\n  "timeout": "%s",\n  "fail_open": false,\n  "mode": "opt-out",\n  "serial_dir": "%s"\n}\n' \
    "${control:-/run/tpmmux/control.sock}" "$timeout" "$serialdir" >/etc/tpmmux/hook.json
fi
if [ ! -e /etc/tpmmux/bridge.json ]; then
  cat >/etc/tpmmux/bridge.json <<'EOF'
{
  "tpm": "device",
  "state_dir": "/var/lib/tpmmux",
  "pcr": 23,
  "host_pcrs": "0-7,10",
  "control_socket": "/run/tpmmux/control.sock",
  "serial_dir": "/run/tpmmux/serial",
  "vsock": "auto",
  "libvirt": "/var/run/libvirt/libvirt-sock",
  "hook": {"mode": "opt-out", "fail_open": false}
}
EOF
fi

if [ -n "$systemd" ]; then
  sed "s|/usr/local/bin/|$prefix/bin/|" "$ROOT/scripts/systemd/tpmmux-bridge.service" >/etc/systemd/system/tpmmux-bridge.service
  chmod 0644 /etc/systemd/system/tpmmux-bridge.service
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi

echo "installed: $prefix/bin/{tpmmux-bridge,tpmmux-hook,tpmmux-verify}, /etc/libvirt/hooks/qemu.d/tpmmux, /etc/tpmmux/*.json${systemd:+, tpmmux-bridge.service}"
if [ -n "$systemd" ]; then
  echo "next: systemctl enable --now tpmmux-bridge && systemctl restart libvirtd (once, for the hooks folder)"
fi
