#!/bin/sh
# /init (PID 1) of the scripts/vmtest guest (busybox sh). It loads the
# kernel modules in /lib/modules/load-order, runs each test binary of
# /vmtest/plan with the environment of /vmtest/env, sends the binaries'
# output and exit statuses to the host on the virtio-serial port
# org.tpmmux.vmtest, and powers off. Console lines starting "VMTEST: " are
# progress marks for a person reading the console log.
#
# /vmtest/plan: one test binary a line, "NAME DIR BINARY RUNREGEX": run
# DIR/BINARY in DIR (go test runs a package's tests in its directory) with
# -test.run RUNREGEX.
# On the port: the binaries' -test.v output, then "VMTEST-RESULT NAME RC"
# after each, and "VMTEST-DONE" at the end.
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mark() { echo "VMTEST: $*"; }
read -r up _ </proc/uptime
mark "init start kernel=$(uname -r) uptime=$up"

while read -r ko; do
  insmod "/lib/modules/$ko" || mark "warning: insmod $ko failed"
done </lib/modules/load-order

out=''
for p in /sys/class/virtio-ports/*; do
  [ -f "$p/name" ] && [ "$(cat "$p/name")" = org.tpmmux.vmtest ] && out=/dev/${p##*/}
done
if [ -z "$out" ] || [ ! -c "$out" ]; then
  mark "error: no virtio-serial port org.tpmmux.vmtest (${out:-none})"
  poweroff -f
fi
mark "results go to $out"

# shellcheck disable=SC1091
. /vmtest/env
while read -r name dir bin regex; do
  case "$name" in '' | '#'*) continue ;; esac
  read -r up _ </proc/uptime
  mark "run $name ($dir/$bin -test.run '$regex') uptime=$up"
  (cd "$dir" && "./$bin" -test.v -test.count=1 -test.timeout=12m -test.run "$regex") >"$out" 2>&1
  rc=$?
  echo "VMTEST-RESULT $name $rc" >"$out"
  read -r up _ </proc/uptime
  mark "result $name $rc uptime=$up"
done </vmtest/plan
echo "VMTEST-DONE" >"$out"
mark "done"
sync
poweroff -f
