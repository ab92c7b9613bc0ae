#!/bin/sh
# /init (PID 1) of a tpmmux e2e guest; build-guest.sh puts it in the
# initramfs. busybox sh. Console lines that start with "TPMMUX-E2E: " are
# markers that scripts poll for.
#
# Kernel command line switches read here (besides the fixed cmdline):
#   tpmmux_e2e.poweroff  power off when done (stand-in) or when the agent exits
#   tpmmux_e2e.exec      exec the agent as PID 1 instead of running it as a child
#   tpmmux_e2e.shell     start a shell on the console at the end (debugging)
#   tpmmux_e2e.nonce=HEX run the agent in the background and attest from inside
#                        the guest with this nonce, printing the files base64
#                        between "attest-begin FILE" and "attest-end FILE" marks
#   tpmmux_e2e.hole=SECS the hole test of a lying guest root: run the agent in
#                        the background, stop it (SIGSTOP) once it streamed,
#                        run /opt/NAME/bin/marker, wait SECS, let the agent go
#                        on (SIGCONT), then print the guest's own PCR 10
#   tpmmux_e2e.tick=SECS run the agent in the background and every SECS write
#                        and run a new program /opt/NAME/tick/t-N (one new IMA
#                        entry each), printing "tick N boot=BOOT-ID" (the
#                        live-migration test: the guest keeps measuring)
export PATH=/sbin:/bin
PORT_NAME=org.tpmmux.0
AGENT=/sbin/tpmmux-agent

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t securityfs securityfs /sys/kernel/security
# Scratch space on ramfs: the IMA policy below does not measure ramfs, so
# files written here (copies of the measurement list) add no entries.
mount -t ramfs ramfs /run

mark() { echo "TPMMUX-E2E: $*"; }
uptime_s() { read -r u _ </proc/uptime; echo "$u"; }
read -r cmdline </proc/cmdline
has_opt() { case " $cmdline " in *" $1 "*) return 0 ;; esac; return 1; }
opt_value() { # opt_value KEY: the value of KEY=VALUE on the kernel cmdline
  for w in $cmdline; do case "$w" in "$1="*) echo "${w#*=}"; return ;; esac; done
}
finish() { # finish: what PID 1 does when there is nothing left to do
  if has_opt tpmmux_e2e.shell; then setsid cttyhack sh; fi
  if has_opt tpmmux_e2e.poweroff; then mark "poweroff"; sync; poweroff -f; fi
  while :; do sleep 3600; done
}

# Read our own config before the IMA policy is loaded, so reads of it are not
# measured (only the guest's programs and data should be).
read -r name </etc/tpmmux-e2e/name
read -r agent_args </etc/tpmmux-e2e/agent-args
mark "init start guest=$name kernel=$(uname -r) uptime=$(uptime_s)"

# 1. virtio modules (Debian builds them as modules), in dependency order.
while read -r ko; do
  insmod "/lib/modules/$ko" || mark "warning: insmod $ko failed"
done </lib/modules/load-order

# 2. IMA policy: it replaces the builtin tcb policy, which does not measure
# anything on the initramfs (rootfs is tmpfs). The whole policy must be one
# write(2); the kernel lets it be written once (no CONFIG_IMA_WRITE_POLICY).
if cat /etc/tpmmux-e2e/ima-policy >/sys/kernel/security/ima/policy; then
  mark "ima policy loaded"
else
  mark "warning: writing the ima policy failed"
fi

# 3. Programs only this guest has, so its IMA log differs from the others'.
for t in /opt/"$name"/bin/tool-*; do "$t"; done
/opt/"$name"/bin/busybox-"$name" true || mark "warning: busybox-$name failed"

# 4. The virtio-serial port. No udev: find it by name in sysfs; devtmpfs
# normally has made the node, else make it from the dev file (MAJ:MIN).
port=
i=0
while :; do
  for n in /sys/class/virtio-ports/*/name; do
    [ -r "$n" ] || continue
    read -r pn <"$n"
    if [ "$pn" = "$PORT_NAME" ]; then d=${n%/name}; port=${d##*/}; fi
  done
  [ -n "$port" ] && break
  i=$((i + 1))
  if [ "$i" -ge 100 ]; then break; fi
  usleep 100000
done
if [ -z "$port" ]; then
  mark "error: no virtio-serial port named $PORT_NAME"
  mark "init done (failed)"
  finish
fi
if [ ! -c "/dev/$port" ]; then
  read -r mm <"/sys/class/virtio-ports/$port/dev"
  mknod "/dev/$port" c "${mm%:*}" "${mm#*:}"
fi
mkdir -p /dev/virtio-ports
ln -sf "../$port" "/dev/virtio-ports/$PORT_NAME"
mark "port $PORT_NAME is /dev/$port"

# 5a. The agent, when the initramfs has one.
if [ -x "$AGENT" ]; then
  mark "init done uptime=$(uptime_s)"
  mark "starting $AGENT $agent_args"
  if has_opt tpmmux_e2e.exec; then
    # shellcheck disable=SC2086 # args are split on purpose
    exec "$AGENT" $agent_args
  fi
  hole=$(opt_value tpmmux_e2e.hole)
  if [ -n "$hole" ]; then
    # shellcheck disable=SC2086
    "$AGENT" $agent_args 2>/run/agent.log &
    apid=$!
    i=0
    while [ "$i" -lt 100 ] && ! grep -q "streaming to the bridge" /run/agent.log; do
      i=$((i + 1))
      usleep 100000
    done
    sleep 3 # let it send what the kernel measured so far
    kill -STOP "$apid"
    mark "agent stopped"
    mark "tpm: $( [ -e /dev/tpm0 ] && echo tpm0 || echo none ), TPM-bypass lines: $(dmesg | grep -c 'TPM-bypass')"
    /opt/"$name"/bin/marker
    mark "marker ran"
    sleep "$hole"
    kill -CONT "$apid"
    mark "agent resumed"
    sleep 3
    for b in sha1 sha256; do
      f=/sys/class/tpm/tpm0/pcr-$b/10
      if [ -r "$f" ]; then mark "guest pcr-$b/10 $(cat "$f")"; fi
    done
    mark "hole test done"
    wait "$apid"
    mark "agent exited $?"
    finish
  fi
  tick=$(opt_value tpmmux_e2e.tick)
  if [ -n "$tick" ]; then
    # shellcheck disable=SC2086
    "$AGENT" $agent_args 2>/run/agent.log &
    apid=$!
    read -r boot </proc/sys/kernel/random/boot_id
    mark "boot id $boot"
    mkdir -p "/opt/$name/tick"
    i=0
    while kill -0 "$apid" 2>/dev/null; do
      i=$((i + 1))
      printf '#!/bin/sh\n# tick %s of %s\n:\n' "$i" "$name" >"/opt/$name/tick/t-$i"
      chmod 0755 "/opt/$name/tick/t-$i"
      "/opt/$name/tick/t-$i"
      mark "tick $i boot=$boot"
      sleep "$tick"
    done
    wait "$apid"
    rc=$?
    # A crash: the head of the Go dump (the panic and the crashing
    # goroutine), then the log's last lines.
    grep -A 12 -m 1 -E '^(panic|fatal error|SIGSEGV|unexpected fault)' /run/agent.log | while read -r l; do mark "agent log: $l"; done
    mark "agent exited $rc after tick $i: $(tail -n 3 /run/agent.log | tr '\n' ' ')"
    finish
  fi
  nonce=$(opt_value tpmmux_e2e.nonce)
  if [ -z "$nonce" ]; then
    # shellcheck disable=SC2086
    "$AGENT" $agent_args
    mark "agent exited $?"
    finish
  fi
  # With tpmmux_e2e.nonce=HEX: stream in the background, then attest from
  # inside the guest through the running agent (its local control socket)
  # and print the files on the console for the host to check.
  # The agent logs to /run/agent.log so its lines do not split the
  # base64 blocks on the console.
  # shellcheck disable=SC2086
  "$AGENT" $agent_args 2>/run/agent.log &
  apid=$!
  i=0
  while [ "$i" -lt 90 ]; do
    # shellcheck disable=SC2086
    if "$AGENT" attest $agent_args --nonce "$nonce" --out /run/attest >/run/attest.log 2>&1; then break; fi
    i=$((i + 1))
    sleep 1
  done
  if [ -f /run/attest/evidence.cbor ]; then
    for f in evidence.cbor identity.json ak.pem nonce.hex; do
      mark "attest-begin $f"
      base64 </run/attest/"$f"
      mark "attest-end $f"
    done
    mark "guest attest done"
  else
    mark "error: guest attest failed: $(cat /run/attest.log)"
  fi
  wait "$apid"
  mark "agent exited $?"
  finish
fi

# 5b. Stand-in for the agent: send the binary measurement list over the port
# and wait for the host's "ACK <entries> <bytes>" (host→guest direction).
# Both lists are copied at once so that the count matches the bytes sent.
ima=/sys/kernel/security/ima
cat $ima/binary_runtime_measurements >/run/ima.bin
cat $ima/ascii_runtime_measurements >/run/ima.txt
entries=$(wc -l </run/ima.txt)
bytes=$(wc -c </run/ima.bin)
mark "ima entries $entries"
mark "ima bytes $bytes"
exec 3<>"/dev/$port"
cat /run/ima.bin >&3 # blocks until the host end is connected
ack=
# shellcheck disable=SC3045 # busybox ash has read -t
while read -r -t 30 a n b <&3; do
  if [ "$a" = ACK ] && [ "$b" = "$bytes" ]; then ack="$n $b"; break; fi
done
if [ -n "$ack" ]; then mark "host ack $ack"; else mark "warning: no ack from host"; fi
mark "init done uptime=$(uptime_s)"
finish
