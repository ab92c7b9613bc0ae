#!/usr/bin/env bash
# End-to-end test of vTPM mode (docs/vtpm.md) on a real libvirtd and QEMU
# (TCG): the bridge on swtpm serves a virtual TPM to an unmodified Debian
# guest kernel over libvirt's external TPM backend; IMA runs in TPM mode and
# every PCR 10 extend is anchored before the measured program runs. It
# shows the hole of agent-only mode closed: a guest root stops its agent and
# runs a marker program. In agent mode the evidence taken then has no trace
# of it (a documented limit); in vTPM mode the verifier rejects the
# unexplained anchored extend, and once the agent resumes it sees and
# appraises the marker. The guest's own PCR 10 equals the verifier's
# reconstruction. Then virsh reset, destroy and post-mortem of the vTPM
# guest. Prints a table; exits non-zero on any failure.
#
#   scripts/e2e-vtpm.sh     (as root; installs what it needs with apt)
#
# Environment: TPMMUX_E2E_WORK (default /var/lib/tpmmux-e2e/vtpm; wiped first),
# TPMMUX_E2E_KEEP=1 keeps the work dir and logs after a success.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${TPMMUX_E2E_WORK:-/var/lib/tpmmux-e2e/vtpm}
RUN=/run/tpmmux-e2e-vtpm
BIN=$WORK/bin
OUT=$WORK/out
HOLE=25 # seconds the guest keeps its agent stopped
NAMES=(vt-tpm vt-agent)
declare -A MODE=([vt-tpm]=vtpm [vt-agent]=agent)
T0=$(date +%s)

say() { printf '[e2e-vtpm %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (libvirtd, hooks, swtpm)"

SWTPM_PID='' BRIDGE_PID='' STARTED_LIBVIRTD='' HOOK_INSTALLED='' CREATED_BRIDGE_CONF=''
cleanup() {
  local rc=$?
  set +e
  stop_host "${NAMES[@]}"
  if [ -n "$HOOK_INSTALLED" ]; then
    bash "$ROOT/scripts/install.sh" --prefix "$WORK/prefix" --uninstall >/dev/null 2>&1
    rm -f /etc/libvirt/hooks/qemu.d/tpmmux /etc/tpmmux/hook.json
  fi
  if [ -n "$CREATED_BRIDGE_CONF" ]; then rm -f /etc/tpmmux/bridge.json; fi
  rmdir /etc/tpmmux 2>/dev/null
  finish_host "$rc"
}
# shellcheck disable=SC1091
. "$ROOT/scripts/e2e/host.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM
marker_line() { grep -F "TPMMUX-E2E: $2" "$WORK/console-$1.log" | tail -1 | tr -d '\r'; }
# evidence VM DIR [verify args...]: host evidence for a fresh nonce, then
# tpmmux-verify; its exit code is returned, the report is DIR/report.json.
evidence() {
  local n=$1 d=$2 nonce
  shift 2
  nonce=$(hexrand 20)
  bridge evidence --vm "$n" --nonce "$nonce" --out "$d" >/dev/null
  set +e
  "$BIN/tpmmux-verify" --evidence "$d/evidence.json" --nonce "$nonce" --identity "$d/identity.json" --ak "$d/ak.pem" --json "$@" >"$d/report.json" 2>"$d/verify.err"
  local rc=$?
  set -e
  return $rc
}
# ---------------------------------------------------------------- set-up
say "installing what is missing"
bash "$ROOT/scripts/setup.sh" test
command -v jq >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null
rm -rf "$WORK" "$RUN"
mkdir -p "$BIN" "$OUT" "$RUN/vtpm" "$WORK/state"

say "building"
build_host_tools

say "building the guests (the compressed kernel: a TPM needs it, see shared vtpm-observed.md)"
declare -A INITRD_OF
for n in "${NAMES[@]}"; do
  printf '#!/bin/sh\necho "the marker program of %s ran"\n' "$n" >"$WORK/marker-$n"
  chmod 0755 "$WORK/marker-$n"
  bash "$ROOT/scripts/e2e/build-guest.sh" "$WORK/guest-$n" --name "$n" --vmlinuz --init-payload "$BIN/tpmmux-agent" \
    --add "$WORK/marker-$n:/opt/$n/bin/marker" >/dev/null
  # shellcheck disable=SC1090,SC1091
  . "$WORK/guest-$n/guest.env"
  var="INITRD_${n//-/_}"
  INITRD_OF[$n]=${!var}
done

say "starting swtpm as the host TPM"
start_swtpm
port=$SWTPM_PORT

say "starting the bridge (vTPM sockets in $RUN/vtpm)"
printf '{"vtpm_dir": "%s", "vtpm_mode": "durable"}\n' "$RUN/vtpm" >"$WORK/bridge.json"
"$BIN/tpmmux-bridge" run --config "$WORK/bridge.json" --tpm "swtpm:127.0.0.1:$port" --state-dir "$WORK/state" \
  --control "$RUN/control.sock" --serial-dir "$RUN/serial" --serial-group root \
  --libvirt /var/run/libvirt/libvirt-sock --host e2e-vtpm-host --log-level info >"$WORK/bridge.log" 2>&1 &
BRIDGE_PID=$!
wait_for 20 "the bridge's control socket" bridge status

say "installing the hook, then (re)starting libvirtd so it sees the hooks folder"
[ -e /etc/tpmmux/bridge.json ] || CREATED_BRIDGE_CONF=1
HOOK_INSTALLED=1
bash "$ROOT/scripts/install.sh" --from "$BIN" --prefix "$WORK/prefix" --no-systemd --control "$RUN/control.sock" --hook-timeout 5s >&2
if bash "$ROOT/scripts/libvirtd.sh" status >/dev/null 2>&1; then bash "$ROOT/scripts/libvirtd.sh" stop >/dev/null; fi
bash "$ROOT/scripts/libvirtd.sh" start >&2
STARTED_LIBVIRTD=1
wait_for 30 "the bridge to follow libvirtd" grep -q "reconcil\|libvirt.*connected\|following libvirt" "$WORK/bridge.log"

# ---------------------------------------------------------------- domains
for n in "${NAMES[@]}"; do
  tpm=''
  if [ "${MODE[$n]}" = vtpm ]; then
    tpm="<tpm model='tpm-crb'><backend type='external' version='2.0'><source type='unix' mode='connect' path='$RUN/vtpm/$n.sock'/></backend></tpm>"
  fi
  define_domain "$n" "${INITRD_OF[$n]}" "tpmmux_e2e.hole=$HOLE" "$tpm"
done
for n in "${NAMES[@]}"; do
  say "virsh start $n (${MODE[$n]} mode)"
  virsh -q start "$n" >/dev/null || die "virsh start $n failed"
done

# ---------------------------------------------------------------- the hole
declare -A R_TPM R_BYPASS R_STOPPED R_RESUMED R_PCR R_RESET R_TEAR R_POST R_RECS
for n in "${NAMES[@]}"; do
  wait_for 180 "$n to run its marker with the agent stopped" marker "$n" "marker ran"
  line=$(marker_line "$n" "tpm: ")
  R_TPM[$n]=$(sed -n 's/.*tpm: \([a-z0-9]*\),.*/\1/p' <<<"$line")
  R_BYPASS[$n]=$(sed -n 's/.*TPM-bypass lines: \([0-9]*\).*/\1/p' <<<"$line")
  sleep 2 # the marker's extend is anchored before it runs; give the agent nothing: it is stopped
  d=$OUT/$n/stopped
  if evidence "$n" "$d"; then
    paths=$("$BIN/e2etool" paths "$d/evidence.json")
    if grep -q "/opt/$n/bin/marker" <<<"$paths"; then die "$n: the stopped agent's evidence names the marker"; fi
    [ "${MODE[$n]}" = agent ] || die "$n: vTPM evidence with the agent stopped was trusted: $(jq -c .vtpm "$d/report.json")"
    R_STOPPED[$n]="trusted, no marker (limit)"
  else
    [ "${MODE[$n]}" = vtpm ] || die "$n: agent-mode evidence rejected: $(head -1 "$d/verify.err")"
    grep -q "anchored PCR 10 extend with no IMA entry" "$d/verify.err" || die "$n: rejected for another reason: $(head -1 "$d/verify.err")"
    R_STOPPED[$n]="rejected: unexplained extend"
  fi
  say "$n with its agent stopped: ${R_STOPPED[$n]}"
done
for n in "${NAMES[@]}"; do
  wait_for $((HOLE + 60)) "$n's agent to resume and the hole test to end" marker "$n" "hole test done"
  R_RECS[$n]=$(settle "$n" 3) || die "$n: records never settled"
  d=$OUT/$n/resumed
  evidence "$n" "$d" || die "$n: evidence after the agent resumed rejected: $(head -1 "$d/verify.err")"
  "$BIN/e2etool" paths "$d/evidence.json" | grep -q "/opt/$n/bin/marker" || die "$n: the marker is not in the evidence after the agent resumed"
  R_RESUMED[$n]="trusted, marker seen"
  if [ "${MODE[$n]}" = vtpm ]; then
    [ "${R_TPM[$n]}" = tpm0 ] && [ "${R_BYPASS[$n]}" = 0 ] || die "$n: IMA did not use the vTPM (tpm ${R_TPM[$n]}, TPM-bypass lines ${R_BYPASS[$n]})"
    jq -e '.vtpm.boot_aggregates_checked >= 1 and .vtpm.paired > 0 and (.vtpm.unexplained // [] | length == 0)' "$d/report.json" >/dev/null ||
      die "$n: vTPM report $(jq -c '.vtpm | del(.pcrs)' "$d/report.json")"
    guest=$(marker_line "$n" "guest pcr-sha256/10" | awk '{print $NF}' | tr 'A-F' 'a-f')
    mine=$(jq -r '.vtpm.pcrs.sha256[10]' "$d/report.json")
    [ -n "$guest" ] && [ "$guest" = "$mine" ] || die "$n: the guest reads PCR 10 = $guest, the verifier reconstructed $mine"
    R_PCR[$n]="guest = verifier"
  else
    R_PCR[$n]="-"
  fi
done

# A policy that allows everything but the marker: the resumed agent's
# marker entry is appraised (a violation naming it).
n=vt-tpm
d=$OUT/$n/resumed
"$BIN/e2etool" paths "$d/evidence.json" | grep -v "/opt/$n/bin/marker" | jq -R -s '
  split("\n") | map(select(length > 0)) | {"meta": {"version": 1}, "release": 0, "digests": {}, "excludes": ., "keyrings": {}, "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": null}, "ima-buf": {}, "verification-keys": ""}' >"$WORK/policy.json"
if evidence "$n" "$OUT/$n/policy" --policy "$WORK/policy.json"; then
  die "$n: the policy did not catch the marker"
fi
grep -q "/opt/$n/bin/marker" "$OUT/$n/policy/verify.err" || die "$n: policy rejection does not name the marker: $(head -1 "$OUT/$n/policy/verify.err")"
APPRAISED="marker is a violation of a policy that omits it"

# ---------------------------------------------------------------- lifecycle
n=vt-tpm
say "virsh reset $n"
boots=$(marker_count "$n" "init start")
virsh -q reset "$n" >/dev/null
wait_for 120 "$n to boot again" bash -c "[ \$(grep -cF 'TPMMUX-E2E: init start' '$WORK/console-$n.log') -gt $boots ]"
wait_for $((HOLE + 120)) "$n's second hole test" bash -c "[ \$(grep -cF 'TPMMUX-E2E: hole test done' '$WORK/console-$n.log') -gt 1 ]"
settle "$n" 3 >/dev/null || die "$n: records never settled after the reset"
d=$OUT/$n/reset
evidence "$n" "$d" || die "$n: evidence after the reset rejected: $(head -1 "$d/verify.err")"
jq -e '.vtpm.boots == 2 and .vtpm.boot_aggregates_checked == 2' "$d/report.json" >/dev/null || die "$n: after the reset: $(jq -c '.vtpm | del(.pcrs)' "$d/report.json")"
guest=$(marker_line "$n" "guest pcr-sha256/10" | awk '{print $NF}' | tr 'A-F' 'a-f')
[ "$guest" = "$(jq -r '.vtpm.pcrs.sha256[10]' "$d/report.json")" ] || die "$n: after the reset the guest's PCR 10 differs from the verifier's"
R_RESET[$n]="2 vTPM boots, PCR 10 equal"
R_RESET[vt-agent]="-"
for n in "${NAMES[@]}"; do
  say "virsh destroy $n"
  virsh -q destroy "$n" >/dev/null
  wait_for 20 "$n's teardown" vm_ended "$n"
  p=$OUT/$n/post
  bridge evidence --vm "$n" --nonce "$(hexrand 20)" --out "$p" >/dev/null
  "$BIN/tpmmux-verify" --evidence "$p/evidence.json" --post-mortem --identity "$OUT/$n/resumed/identity.json" --ak "$OUT/$n/resumed/ak.pem" --json >"$p/report.json" ||
    die "$n: post-mortem evidence rejected"
  R_TEAR[$n]=$(jq -r '.teardown.detail // empty' "$p/report.json")
  R_POST[$n]=trusted
done

# ---------------------------------------------------------------- summary
printf '\n%-9s %-6s %8s  %-6s %-30s %-22s %-17s %-26s %-10s %-11s\n' VM MODE RECORDS TPM "AGENT STOPPED, MARKER RAN" "AGENT RESUMED" "GUEST PCR 10" RESET TEARDOWN POST-MORTEM
for n in "${NAMES[@]}"; do
  printf '%-9s %-6s %8s  %-6s %-30s %-22s %-17s %-26s %-10s %-11s\n' "$n" "${MODE[$n]}" "${R_RECS[$n]}" "${R_TPM[$n]}" "${R_STOPPED[$n]}" "${R_RESUMED[$n]}" "${R_PCR[$n]}" "${R_RESET[$n]}" "${R_TEAR[$n]}" "${R_POST[$n]}"
done
printf '\npolicy: %s; elapsed %ss\n' "$APPRAISED" "$(($(date +%s) - T0))"
echo "e2e-vtpm: all checks passed"
