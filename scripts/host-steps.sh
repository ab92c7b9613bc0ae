#!/usr/bin/env bash
# CI: follows the README's "On a host" steps (and docs/hook.md's) as a new
# operator would, on this machine, with nothing but what they say: build
# the package and `apt install` it, use the documented swtpm unit as the
# host's TPM with the documented "tpm" value, start the bridge as the unit
# does, restart libvirtd, start a domain with the documented channel XML,
# get its evidence with `tpmmux-bridge evidence` and verify it with
# `tpmmux-verify`; then purge everything. Where systemd is not PID 1 (CI
# containers) it runs each unit's own ExecStartPre/ExecStart lines, which
# is what install.sh and the package tell such hosts to do. Run as root,
# never together with scripts/e2e.sh (both drive the system libvirtd).
#
#   scripts/host-steps.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
T0=$(date +%s)
say() { printf '[host-steps %3ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
dpkg-query -W -f='${Status}' tpmmux 2>/dev/null | grep -q "install ok" && die "tpmmux is installed already: this test would purge it"
# A configuration or state that is not the package's (a manual install, an
# interrupted run) is set aside for the run and put back afterwards, so the
# purge at the end takes nothing of it.
SETASIDE_TAG=host-steps
# shellcheck source=scripts/setaside.sh
. "$ROOT/scripts/setaside.sh"
[ -e /etc/libvirt/hooks/qemu.d/tpmmux ] && die "a tpmmux hook is installed already (scripts/e2e.sh running?)"
[ -e /var/lib/tpmmux-swtpm ] && die "/var/lib/tpmmux-swtpm exists: this test would remove it"

WORK=$(mktemp -d)
NAME=hoststeps-a
PIDS=() INSTALLED='' STARTED_LIBVIRTD='' DEFINED=''
cleanup() {
  local rc=$?
  set +e
  if [ -n "$DEFINED" ]; then virsh -q destroy "$NAME" >/dev/null 2>&1; virsh -q undefine "$NAME" >/dev/null 2>&1; fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null && wait "${PIDS[$i]}" 2>/dev/null; done
  [ -n "$INSTALLED" ] && DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tpmmux >/dev/null 2>&1
  rm -rf /var/lib/tpmmux-swtpm /run/tpmmux-swtpm
  [ -n "$STARTED_LIBVIRTD" ] && bash "$ROOT/scripts/libvirtd.sh" stop >/dev/null 2>&1
  if ((rc != 0)); then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "$WORK"
  put_back
  exit "$rc"
}
trap cleanup EXIT
set_aside /etc/tpmmux
set_aside /var/lib/tpmmux

# unit_lines UNIT KEY: the values of KEY= in a unit file, continuation
# lines joined.
unit_lines() { sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$1" | sed -n "s/^$2=//p"; }
# start_unit UNIT LOG: start a unit as systemd would, or, without systemd
# as PID 1, run its ExecStartPre lines and then its ExecStart in the
# background with its RuntimeDirectory and StateDirectory made.
start_unit() {
  local unit=$1 log=$2 d
  if [ -d /run/systemd/system ] && [ "$(cat /proc/1/comm)" = systemd ]; then
    systemctl daemon-reload && systemctl enable --now "$(basename "$unit")"
    return
  fi
  for d in $(unit_lines "$unit" RuntimeDirectory); do mkdir -p "/run/$d"; done
  for d in $(unit_lines "$unit" StateDirectory); do mkdir -p "/var/lib/$d"; done
  while read -r line; do [ -n "$line" ] && bash -c "$line" >>"$log" 2>&1; done < <(unit_lines "$unit" ExecStartPre)
  bash -c "exec $(unit_lines "$unit" ExecStart)" >>"$log" 2>&1 &
  PIDS+=($!)
}

say "README: build the package and apt install it"
deb=$(bash "$ROOT/scripts/package.sh" --out "$WORK/dist")
INSTALLED=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >"$WORK/apt.log" 2>&1 || die "apt install: $(tail -3 "$WORK/apt.log")"

say "docs/hook.md: a host without a TPM uses swtpm, with the example unit"
command -v swtpm_setup >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq swtpm swtpm-tools >/dev/null
unit=/usr/share/doc/tpmmux/examples/tpmmux-swtpm.service
start_unit "$unit" "$WORK/swtpm.log"
for _ in $(seq 100); do [ -S /run/tpmmux-swtpm/tpm.sock ] && break; sleep 0.1; done
[ -S /run/tpmmux-swtpm/tpm.sock ] || die "the swtpm unit did not make /run/tpmmux-swtpm/tpm.sock"
# "and in /etc/tpmmux/bridge.json set exactly"
jq '.tpm = "swtpm:unix:/run/tpmmux-swtpm/tpm.sock"' /etc/tpmmux/bridge.json >"$WORK/bridge.json"
cat "$WORK/bridge.json" >/etc/tpmmux/bridge.json

say "README: start the bridge (the unit's ExecStart), then restart libvirtd once"
start_unit /lib/systemd/system/tpmmux-bridge.service "$WORK/bridge.log"
for _ in $(seq 100); do tpmmux-bridge status >/dev/null 2>&1 && break; sleep 0.2; done
tpmmux-bridge status >"$WORK/status.txt" || die "tpmmux-bridge status: $(tail -3 "$WORK/bridge.log")"
if bash "$ROOT/scripts/libvirtd.sh" status >/dev/null 2>&1; then bash "$ROOT/scripts/libvirtd.sh" stop >/dev/null; fi
bash "$ROOT/scripts/libvirtd.sh" start >&2
STARTED_LIBVIRTD=1

say "docs/hook.md: a domain with the org.tpmmux.0 channel, streaming with the packaged agent"
bash "$ROOT/scripts/e2e/build-guest.sh" "$WORK/guest" --name "$NAME" --init-payload /usr/share/tpmmux/guest/tpmmux-agent >/dev/null
# shellcheck disable=SC1091
. "$WORK/guest/guest.env"
initrd_var="INITRD_${NAME//-/_}"
cat >"$WORK/$NAME.xml" <<XML
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>${!initrd_var}</initrd>
    <cmdline>$CMDLINE</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='$WORK/console.log'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='connect' path='/run/tpmmux/serial/$NAME.sock'>
        <reconnect enabled='yes' timeout='2'/>
      </source>
      <target type='virtio' name='org.tpmmux.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh -q define "$WORK/$NAME.xml" >/dev/null
DEFINED=1
virsh -q start "$NAME" >/dev/null || die "virsh start $NAME"
tpmmux-bridge vms | grep -q "^$NAME .*live" || die "tpmmux-bridge vms does not list $NAME as live: $(tpmmux-bridge vms)"
last=-1
for _ in $(seq 180); do
  cur=$(tpmmux-bridge vms --json | jq -r --arg n "$NAME" '[(. // [])[] | select(.name == $n and .live)][0].records // 0')
  if [ "$cur" = "$last" ] && [ "$cur" -gt 5 ]; then break; fi
  last=$cur
  sleep 1
done
[ "$cur" -gt 5 ] || die "$NAME's measurements never arrived ($cur records)"

say "README: tpmmux-bridge evidence, then tpmmux-verify"
nonce=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
tpmmux-bridge evidence --vm "$NAME" --nonce "$nonce" --out "$WORK/ev" >"$WORK/evidence.txt"
tpmmux-verify --evidence "$WORK/ev/evidence.json" --nonce "$nonce" --identity "$WORK/ev/identity.json" --ak "$WORK/ev/ak.pem" --json >"$WORK/report.json" ||
  die "tpmmux-verify rejected the evidence: $(head -3 "$WORK/report.json")"
meas=$(jq '.counts.measurements' "$WORK/report.json")
((meas > 0)) || die "the report shows no measurements"
say "host steps: installed, swtpm, bridge, libvirtd, $NAME attested with $meas measurements and verified"
