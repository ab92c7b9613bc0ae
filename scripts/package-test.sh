#!/usr/bin/env bash
# CI test of the Debian package: build it (scripts/package.sh), install it
# with apt as an operator would, check what it put where (static binaries,
# conffiles, unit, hook, man pages), run the installed `tpmmux-bridge run`
# against swtpm until `tpmmux-bridge status` answers, then remove and purge
# it and check that nothing is left. Run as root on a host without tpmmux
# installed; takes about a minute.
#
#   scripts/package-test.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
T0=$(date +%s)
say() { printf '[package-test %3ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (apt install)"
if dpkg-query -W -f='${Status}' tpmmux 2>/dev/null | grep -q "install ok"; then die "tpmmux is installed already: this test would remove it"; fi
# A configuration or state that is not the package's (a manual install, an
# interrupted run) is set aside for the run and put back afterwards: the
# purge below must find these paths empty, and must not take anything.
SETASIDE_TAG=package-test
# shellcheck source=scripts/setaside.sh
. "$ROOT/scripts/setaside.sh"
[ -e /etc/libvirt/hooks/qemu.d/tpmmux ] && die "a tpmmux hook is installed already (scripts/e2e.sh running?)"
command -v swtpm >/dev/null || bash "$ROOT/scripts/setup.sh" test

WORK=$(mktemp -d)
SWTPM_PID='' BRIDGE_PID='' INSTALLED=''
cleanup() {
  local rc=$?
  set +e
  [ -n "$BRIDGE_PID" ] && kill -TERM "$BRIDGE_PID" 2>/dev/null && wait "$BRIDGE_PID" 2>/dev/null
  [ -n "$SWTPM_PID" ] && kill -TERM "$SWTPM_PID" 2>/dev/null && wait "$SWTPM_PID" 2>/dev/null
  [ -n "$INSTALLED" ] && DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tpmmux >/dev/null 2>&1
  if ((rc != 0)); then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "---- $f" >&2; tail -n 20 "$f" >&2; }; done
  fi
  rm -rf "$WORK"
  put_back
  exit "$rc"
}
trap cleanup EXIT
set_aside /etc/tpmmux
set_aside /var/lib/tpmmux

say "building the package"
deb=$(bash "$ROOT/scripts/package.sh" --out "$WORK/dist")
say "apt install $deb"
INSTALLED=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" >"$WORK/install.log" 2>&1 || die "apt install failed: $(tail -5 "$WORK/install.log")"
dpkg-query -W -f='${Status}\n' tpmmux | grep -q "install ok installed" || die "tpmmux not installed"

say "checking the installed files"
for b in /usr/bin/tpmmux-bridge /usr/bin/tpmmux-hook /usr/bin/tpmmux-verify /usr/share/tpmmux/guest/tpmmux-agent; do
  [ -x "$b" ] || die "$b missing"
  # Static: no program interpreter, so no libc, no libcrypto, no Go needed.
  LC_ALL=C readelf -lW "$b" | grep -q 'Requesting program interpreter' && die "$b is dynamically linked"
  "$b" --version | grep -qx "$(basename "$b") [0-9.]*" || die "$b --version"
done
[ "$(readlink /etc/libvirt/hooks/qemu.d/tpmmux)" = /usr/bin/tpmmux-hook ] || die "the hook is not linked into /etc/libvirt/hooks/qemu.d"
conf=$(dpkg-query -W -f='${Conffiles}' tpmmux)
for c in /etc/tpmmux/bridge.json /etc/tpmmux/hook.json; do
  grep -q " $c " <<<"$conf" || die "$c is not a conffile"
done
[ -f /lib/systemd/system/tpmmux-bridge.service ] || die "no unit"
grep -q '^ExecStart=/usr/bin/tpmmux-bridge run' /lib/systemd/system/tpmmux-bridge.service || die "the unit does not run /usr/bin/tpmmux-bridge"
for m in man8/tpmmux-bridge.8.gz man8/tpmmux-hook.8.gz man1/tpmmux-verify.1.gz man1/tpmmux-agent.1.gz; do
  [ -f "/usr/share/man/$m" ] || die "no man page $m"
done
zcat /usr/share/man/man8/tpmmux-bridge.8.gz | grep -q 'key\\-retention' || die "the bridge's man page lacks its run flags"
[ -f /usr/share/tpmmux/guest/tpmmux-agent.service ] || die "no guest unit"
[ -f /usr/share/doc/tpmmux/examples/tpmmux-swtpm.service ] || die "no swtpm example unit"
# The hook reads the installed configuration: with no bridge and the
# default fail-closed hook.json, a start is refused with the fix named.
set +e
out=$(TPMMUX_HOOK_CONFIG=/etc/tpmmux/hook.json timeout 10 /etc/libvirt/hooks/qemu.d/tpmmux pkgtest prepare begin - \
  <"$ROOT/libvirt/testdata/vm-a.xml" 2>&1)
rc=$?
set -e
((rc == 1)) && grep -q "set fail_open in /etc/tpmmux/hook.json" <<<"$out" || die "installed hook with no bridge: exit $rc, $out"

say "tpmmux-bridge run against swtpm (the example unit's socket form)"
mkdir -p "$WORK/swtpm" "$WORK/run"
swtpm socket --tpm2 --tpmstate dir="$WORK/swtpm" \
  --server type=unixio,path="$WORK/run/tpm.sock",mode=0600 --ctrl type=unixio,path="$WORK/run/ctrl.sock",mode=0600 \
  --flags not-need-init,startup-clear >"$WORK/swtpm.log" 2>&1 &
SWTPM_PID=$!
for _ in $(seq 50); do [ -S "$WORK/run/tpm.sock" ] && break; sleep 0.1; done
echo '{}' >"$WORK/bridge.json"
# A minimal environment: the static binary needs nothing from PATH.
env -i /usr/bin/tpmmux-bridge run --config "$WORK/bridge.json" --tpm "swtpm:unix:$WORK/run/tpm.sock" \
  --state-dir "$WORK/state" --control "$WORK/run/control.sock" --serial-dir "$WORK/run/serial" --vsock off \
  >"$WORK/bridge.log" 2>&1 &
BRIDGE_PID=$!
ok=''
for _ in $(seq 100); do
  if /usr/bin/tpmmux-bridge status --control "$WORK/run/control.sock" >"$WORK/status.txt" 2>/dev/null; then ok=1; break; fi
  kill -0 "$BRIDGE_PID" 2>/dev/null || die "the installed bridge exited: $(tail -3 "$WORK/bridge.log")"
  sleep 0.2
done
[ -n "$ok" ] || die "the installed bridge never answered"
grep -q "swtpm:unix:$WORK/run/tpm.sock" "$WORK/status.txt" || die "status does not show the swtpm: $(cat "$WORK/status.txt")"
kill -TERM "$BRIDGE_PID"
wait "$BRIDGE_PID" || die "the bridge exited non-zero on SIGTERM"
BRIDGE_PID=''

say "apt remove, then purge"
files=$(dpkg-query -L tpmmux | while read -r f; do [ -d "$f" ] || echo "$f"; done)
DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq tpmmux >"$WORK/remove.log" 2>&1 || die "apt remove failed: $(tail -5 "$WORK/remove.log")"
while read -r f; do
  case "$f" in /etc/tpmmux/*) continue ;; esac # conffiles stay until purge
  [ -e "$f" ] || [ -L "$f" ] && die "$f is left after remove"
done <<<"$files"
[ -f /etc/tpmmux/bridge.json ] || die "remove took the configuration (it should stay until purge)"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq tpmmux >"$WORK/purge.log" 2>&1 || die "apt purge failed: $(tail -5 "$WORK/purge.log")"
INSTALLED=''
for p in /etc/tpmmux /var/lib/tpmmux /etc/libvirt/hooks/qemu.d/tpmmux /lib/systemd/system/tpmmux-bridge.service /usr/share/doc/tpmmux; do
  [ -e "$p" ] || [ -L "$p" ] && die "$p is left after purge"
done
left=$(find /etc/systemd/system -name 'tpmmux*' 2>/dev/null)
[ -z "$left" ] || die "left after purge: $left"
dpkg-query -W -f='${Status}' tpmmux 2>/dev/null | grep -q "installed" && die "dpkg still lists tpmmux"
say "package: built, installed, ran on swtpm, removed and purged cleanly"
