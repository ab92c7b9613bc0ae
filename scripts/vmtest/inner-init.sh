#!/bin/sh
# /init (PID 1) of the nested guest of scripts/vmtest (busybox sh), started
# by TestNestedVsockBridge inside the outer guest with
# -device vhost-vsock-pci,guest-cid=N. It loads the virtio and vsock guest
# modules, runs TestNestedVsockGuest (internal/agent) with the spec from
# tpmmux_vmtest.guest=CID,OTHERCID,NONCEHEX,REPORTPORT on the kernel command
# line, prints "VMTEST-INNER-RESULT RC" on the console and powers off.
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
read -r up _ </proc/uptime
echo "VMTEST-INNER: init start uptime=$up"
while read -r ko; do
  insmod "/lib/modules/$ko" || echo "VMTEST-INNER: warning: insmod $ko failed"
done </lib/modules/load-order
spec=''
read -r cmdline </proc/cmdline
for w in $cmdline; do
  case "$w" in tpmmux_vmtest.guest=*) spec=${w#*=} ;; esac
done
export TPMMUX_VSOCK_NESTED_GUEST="$spec"
cd /src/internal/agent
./agent.test -test.v -test.count=1 -test.timeout=12m -test.run '^TestNestedVsockGuest$'
rc=$?
read -r up _ </proc/uptime
echo "VMTEST-INNER-RESULT $rc uptime=$up"
sync
poweroff -f
