# shellcheck shell=bash
# The host side shared by scripts/e2e.sh and scripts/e2e-vtpm.sh (sourced,
# not run). The caller defines say and die, and sets ROOT, WORK, RUN, BIN
# and BRIDGE_PID (empty until the bridge runs).

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds.
wait_for() {
  local secs=$1 what=$2
  shift 2
  local end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    (($(date +%s) < end)) || die "timed out after ${secs}s waiting for $what"
    if [ -n "$BRIDGE_PID" ] && ! kill -0 "$BRIDGE_PID" 2>/dev/null; then die "the bridge exited"; fi
    sleep 0.3
  done
}
# marker VM TEXT: the guest printed "TPMMUX-E2E: TEXT" on its console.
marker() { grep -qF "TPMMUX-E2E: $2" "$WORK/console-$1.log" 2>/dev/null; }
marker_count() { grep -cF "TPMMUX-E2E: $2" "$WORK/console-$1.log" 2>/dev/null || true; }
hexrand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
bridge() { "$BIN/tpmmux-bridge" "$@" --control "$RUN/control.sock"; }
verify() { "$BIN/tpmmux-verify" "$@"; }

# vm_records VM: the record count of VM's live instance.
vm_records() { bridge vms --json | jq -r --arg n "$1" '[(. // [])[] | select(.name == $n and .live)][0].records // 0'; }
# vm_ended VM: every instance of VM has ended.
vm_ended() { bridge vms --all --json | jq -e --arg n "$1" '[(. // [])[] | select(.name == $n)] | length > 0 and all(.live | not)' >/dev/null; }
# settle VM [MIN]: wait until VM's record count (above MIN, default 5)
# stops growing (every guest entry acknowledged) and print it.
settle() {
  local n=$1 min=${2:-5} last=-1 cur
  for _ in $(seq 1 60); do
    cur=$(vm_records "$n" || echo 0)
    if [ "$cur" = "$last" ] && [ "${cur:-0}" -gt "$min" ]; then echo "$cur"; return 0; fi
    last=$cur
    sleep 1
  done
  return 1
}

# build_host_tools: the bridge, hook, verifier and e2etool into $BIN, the
# static guest agent as $BIN/tpmmux-agent.
build_host_tools() {
  (cd "$ROOT" && go build -o "$BIN/" ./cmd/tpmmux-bridge ./cmd/tpmmux-hook ./cmd/tpmmux-verify ./scripts/e2e/e2etool)
  (cd "$ROOT" && CGO_ENABLED=0 go build -o "$BIN/tpmmux-agent" ./cmd/tpmmux-agent)
}

# start_swtpm: swtpm on loopback as the host TPM; sets SWTPM_PID and
# SWTPM_PORT (its control port is SWTPM_PORT+1).
start_swtpm() {
  SWTPM_PORT=$((20000 + RANDOM % 20000))
  mkdir -p "$WORK/swtpm"
  swtpm socket --tpm2 --tpmstate dir="$WORK/swtpm" \
    --server type=tcp,port=$SWTPM_PORT,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((SWTPM_PORT + 1)),bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear >"$WORK/swtpm.log" 2>&1 &
  SWTPM_PID=$!
  wait_for 10 "swtpm" bash -c "exec 3<>/dev/tcp/127.0.0.1/$SWTPM_PORT"
}

# show_logs: the tails of the bridge log and the guests' consoles (after a
# failure).
show_logs() {
  say "logs kept in $WORK (bridge.log, console-*.log)"
  for f in "$WORK"/bridge.log "$WORK"/console-*.log; do
    [ -f "$f" ] && { echo "---- tail $f" >&2; tail -n 25 "$f" >&2; }
  done
}

# finish_host RC: the end of a script's cleanup: stop libvirtd if the script
# started it, then show the logs after a failure (or drop the outputs after
# a success, unless TPMMUX_E2E_KEEP=1), and exit with RC.
finish_host() {
  local rc=$1
  if [ -n "$STARTED_LIBVIRTD" ]; then bash "$ROOT/scripts/libvirtd.sh" stop >/dev/null 2>&1; fi
  if ((rc != 0)); then
    show_logs
  elif [ "${TPMMUX_E2E_KEEP:-}" != 1 ]; then
    rm -rf "$OUT" "$WORK/state"
  fi
  exit "$rc"
}

# stop_host DOMAIN...: destroy and undefine the domains, stop the bridge and
# swtpm (the start of a script's cleanup).
stop_host() {
  local n
  for n in "$@"; do
    virsh -q destroy "$n" >/dev/null 2>&1
    virsh -q undefine "$n" >/dev/null 2>&1
  done
  if [ -n "$BRIDGE_PID" ]; then kill -TERM "$BRIDGE_PID" 2>/dev/null; wait "$BRIDGE_PID" 2>/dev/null; fi
  if [ -n "$SWTPM_PID" ]; then kill -TERM "$SWTPM_PID" 2>/dev/null; wait "$SWTPM_PID" 2>/dev/null; fi
  return 0
}

# define_domain NAME INITRD CMDLINE-EXTRA [DEVICES]: define the e2e guest
# NAME (the kernel $KERNEL with $CMDLINE and CMDLINE-EXTRA, its console in
# $WORK/console-NAME.log, the org.tpmmux.0 channel to the bridge's socket
# in $RUN/serial, and DEVICES, e.g. a <tpm>). $CONSOLE_ATTRS goes into the
# console's <source> (e2e-migrate.sh: " append='on'").
define_domain() {
  local n=$1 initrd=$2 extra=$3 devices=${4:-}
  # Left over from an interrupted run (its cleanup could not reach libvirtd)?
  virsh -q destroy "$n" >/dev/null 2>&1 || true
  virsh -q undefine "$n" >/dev/null 2>&1 || true
  cat >"$WORK/$n.xml" <<XML
<domain type='qemu'>
  <name>$n</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>$initrd</initrd>
    <cmdline>$CMDLINE $extra</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='$WORK/console-$n.log'${CONSOLE_ATTRS:-}/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='connect' path='$RUN/serial/$n.sock'><reconnect enabled='yes' timeout='2'/></source>
      <target type='virtio' name='org.tpmmux.0'/>
    </channel>
    $devices
    <memballoon model='none'/>
  </devices>
</domain>
XML
  virsh -q define "$WORK/$n.xml" >/dev/null
}
