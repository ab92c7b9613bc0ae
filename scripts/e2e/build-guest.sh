#!/usr/bin/env bash
# Builds tiny bootable guests for tpmmux's end-to-end tests: Debian's
# linux-image-6.1 kernel and one busybox initramfs per named guest whose
# /init (scripts/e2e/init.sh) enables IMA measurement, runs programs only
# that guest has, finds the org.tpmmux.0 virtio-serial port and then runs
# the agent (or a stand-in that writes the IMA list to the port).
#
#   build-guest.sh OUTDIR [--name NAME]... [--init-payload FILE]
#                  [--agent-args ARGS] [--add SRC:GUESTPATH]... [--vsock]
#                  [--gzip] [--vmlinuz]
#   build-guest.sh --print-cmdline
#
#   --name NAME          build OUTDIR/initrd-NAME.img (repeatable; default: guest1).
#                        NAME: letters, digits, '.', '_' and '-'.
#   --init-payload FILE  a static binary installed as /sbin/tpmmux-agent and
#                        run by /init with ARGS (default: --transport virtio-serial).
#                        Without it /init runs the stand-in.
#   --agent-args ARGS    the agent's arguments (one string, split on spaces).
#   --add SRC:GUESTPATH  also put file SRC at GUESTPATH in every initramfs (repeatable).
#   --vsock              also load vsock + vmw_vsock_virtio_transport in the guest.
#   --gzip               gzip the initramfs (default: uncompressed newc cpio,
#                        which boots faster under TCG).
#   --vmlinuz            use the compressed kernel (OUTDIR/vmlinuz) instead of
#                        the unpacked OUTDIR/vmlinux.
#   --print-cmdline      print the guests' kernel command line and exit.
#
# Stdout: shell assignments for callers, e.g. `eval "$(build-guest.sh out)"`:
#   KERNEL=... CMDLINE=... INITRD_<NAME>=... (NAME with '-' and '.' as '_')
# The same is written to OUTDIR/guest.env, and the cmdline to OUTDIR/cmdline.
#
# Environment:
#   TPMMUX_E2E_CACHE        cache dir (default $XDG_CACHE_HOME/tpmmux-e2e, or
#                           /var/cache/tpmmux-e2e for root)
#   TPMMUX_E2E_KERNEL_PKG   kernel package (default: what linux-image-amd64
#                           depends on if it is 6.1, else the newest
#                           linux-image-6.1.0-N-amd64 apt knows)
#   SOURCE_DATE_EPOCH       mtime of every initramfs file (default 1700000000)
set -euo pipefail
E2E_PROG=build-guest.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() { sed -n '/^#   build-guest.sh OUTDIR/,/^#   --print-cmdline /p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

outdir='' names=() payload='' agent_args='--transport virtio-serial' adds=() vsock='' gzip='' want_vmlinux=1
while (($#)); do
  case "$1" in
    --name) names+=("${2:?--name NAME}"); shift 2 ;;
    --init-payload) [ -z "$payload" ] || e2e_die "--init-payload given twice"; payload=${2:?--init-payload FILE}; shift 2 ;;
    --print-cmdline) echo "$E2E_CMDLINE"; exit 0 ;;
    --agent-args) agent_args=${2?--agent-args ARGS}; shift 2 ;;
    --add) adds+=("${2:?--add SRC:GUESTPATH}"); shift 2 ;;
    --vsock) vsock=1; shift ;;
    --gzip) gzip=1; shift ;;
    --vmlinuz) want_vmlinux=; shift ;;
    -h | --help) usage ;;
    -*) e2e_log "unknown option $1"; usage ;;
    *) [ -z "$outdir" ] || usage; outdir=$1; shift ;;
  esac
done
[ -n "$outdir" ] || usage
((${#names[@]})) || names=(guest1)
for n in "${names[@]}"; do
  [[ "$n" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || e2e_die "bad guest name '$n'"
done
if [ -n "$payload" ]; then
  [ -f "$payload" ] || e2e_die "--init-payload $payload: no such file"
  if command -v file >/dev/null && ! file -L "$payload" | grep -q 'statically linked\|static-pie'; then
    e2e_log "warning: $payload does not look statically linked (the guest has no libc)"
  fi
fi
for a in "${adds[@]}"; do
  [ -f "${a%%:*}" ] && [[ "${a#*:}" == /* ]] || e2e_die "--add $a: want an existing SRC and an absolute GUESTPATH"
done
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
t0=$(e2e_now)

# ---- host packages -------------------------------------------------------
need=(busybox-static cpio xz-utils)
[ -n "$gzip" ] && need+=(gzip)
e2e_ensure_pkgs "${need[@]}"
busybox=/bin/busybox
[ -x "$busybox" ] || e2e_die "$busybox missing (busybox-static)"

# ---- kernel package: name and version --------------------------------------
cache=$(e2e_cache_dir)
kcache=$cache/kernel

pick_kernel_pkg() {
  if [ -n "${TPMMUX_E2E_KERNEL_PKG:-}" ]; then echo "$TPMMUX_E2E_KERNEL_PKG"; return; fi
  local p
  p=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.[0-9]+-[0-9]+-amd64$/ { print $2; exit }')
  [ -n "$p" ] || p=$(apt-cache pkgnames linux-image-6.1 2>/dev/null | grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-amd64$' | sort -V | tail -n1)
  echo "$p"
}
candidate() { apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'; }

# apt-cache takes ~1 s a call here, so the answer is memoized for as long as
# the apt lists (and the override) stay the same.
lists_sig() { (echo "${TPMMUX_E2E_KERNEL_PKG:-}"; stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null) | md5sum | cut -c1-32; }
memo=$kcache/.resolved
kpkg='' kver_pkg=''
if [ -f "$memo" ] && read -r sig p v <"$memo" && [ "$sig" = "$(lists_sig)" ]; then
  kpkg=$p kver_pkg=$v
else
  kpkg=$(pick_kernel_pkg)
  [ -n "$kpkg" ] && kver_pkg=$(candidate "$kpkg")
fi
if [ -z "$kver_pkg" ]; then
  # Empty or stale apt lists: update once and ask again.
  if e2e_try_apt_update; then
    kpkg=$(pick_kernel_pkg)
    [ -n "$kpkg" ] && kver_pkg=$(candidate "$kpkg")
  fi
fi
if [ -n "$kver_pkg" ]; then
  kdir=$kcache/${kpkg}_$kver_pkg
  mkdir -p "$kcache" && echo "$(lists_sig) $kpkg $kver_pkg" >"$memo"
else
  # Offline: use the newest complete cache entry.
  kdir=$(ls -d "$kcache"/*/.complete 2>/dev/null | sed 's,/\.complete$,,' | sort -V | tail -n1)
  [ -n "$kdir" ] || e2e_die "apt knows no linux-image-6.1*-amd64 package and the cache ($kcache) is empty"
  e2e_log "apt has no kernel candidate; using cached $(basename "$kdir")"
fi

# ---- kernel cache: fetch, unpack, keep only what the guests need ------------
# Layout of $kdir: vmlinuz, vmlinux (unpacked, when that worked), config,
# kver, modules/<name>.ko (uncompressed), modules/<name>.deps, .complete
wanted_modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_console
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)

# unpack_vmlinux VMLINUZ OUT: find the compressed payload in the bzImage (as
# the kernel's scripts/extract-vmlinux does) and decompress it to an ELF.
unpack_vmlinux() {
  local z=$1 out=$2 magic tool off
  for spec in 'xz:\xfd\x37\x7a\x58\x5a\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
    tool=${spec%%:*} magic=${spec#*:}
    command -v "$tool" >/dev/null || continue
    for off in $(LC_ALL=C grep -aboP "$magic" "$z" 2>/dev/null | cut -d: -f1 | head -n5); do
      tail -c +$((off + 1)) "$z" | "$tool" -dc 2>/dev/null >"$out.tmp" || true # trailing data makes it complain
      if [ "$(head -c4 "$out.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && [ "$(stat -c %s "$out.tmp")" -gt 1000000 ]; then
        mv "$out.tmp" "$out"
        e2e_log "unpacked vmlinux ($tool payload at offset $off)"
        return 0
      fi
    done
  done
  rm -f "$out.tmp"
  return 1
}

fetch_kernel() {
  [ -n "$kver_pkg" ] || e2e_die "cannot fetch a kernel without apt"
  local tmp x kver ko m f
  e2e_log "fetching $kpkg $kver_pkg into $kdir"
  mkdir -p "$kcache"
  tmp=$(mktemp -d "$kcache/.fetch.XXXXXX")
  # apt-get download drops privileges to _apt: let it write there.
  id _apt >/dev/null 2>&1 && chown _apt "$tmp" 2>/dev/null || true
  (cd "$tmp" && apt-get download -qq "$kpkg=$kver_pkg") || { rm -rf "$tmp"; e2e_die "apt-get download $kpkg=$kver_pkg failed"; }
  x=$tmp/root
  dpkg -x "$tmp"/*.deb "$x"
  rm -f "$tmp"/*.deb
  kver=$(ls "$x/lib/modules" | head -n1)
  [ -n "$kver" ] && [ -f "$x/boot/vmlinuz-$kver" ] || { rm -rf "$tmp"; e2e_die "$kpkg has no vmlinuz/modules"; }
  mkdir -p "$tmp/k/modules"
  cp "$x/boot/vmlinuz-$kver" "$tmp/k/vmlinuz"
  cp "$x/boot/config-$kver" "$tmp/k/config"
  echo "$kver" >"$tmp/k/kver"
  for m in "${wanted_modules[@]}"; do
    # Debian names files with '_' or '-' and may compress them (.ko.xz/.ko.zst).
    f=$(find "$x/lib/modules/$kver" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -n1)
    if [ -z "$f" ]; then
      if grep -qE "^CONFIG_$(echo "$m" | tr '[:lower:]' '[:upper:]')=y" "$tmp/k/config" 2>/dev/null; then continue; fi
      e2e_log "warning: module $m not in $kpkg (built in?)"
      continue
    fi
    ko=$tmp/k/modules/$m.ko
    case "$f" in
      *.ko) cp "$f" "$ko" ;;
      *.ko.xz) xz -dc "$f" >"$ko" ;;
      *.ko.zst) e2e_ensure_pkgs zstd; zstd -qdc "$f" >"$ko" ;;
      *.ko.gz) gzip -dc "$f" >"$ko" ;;
      *) e2e_die "unknown module file $f" ;;
    esac
    # depends= from the module's .modinfo section (no modules.dep in the .deb).
    tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ' >"$tmp/k/modules/$m.deps"
  done
  if ! unpack_vmlinux "$tmp/k/vmlinuz" "$tmp/k/vmlinux"; then
    e2e_log "warning: could not unpack vmlinux from vmlinuz; guests will boot vmlinuz"
  fi
  touch "$tmp/k/.complete"
  rm -rf "$kdir"
  mv "$tmp/k" "$kdir"
  rm -rf "$tmp"
}

if [ ! -f "$kdir/.complete" ]; then
  mkdir -p "$kcache"
  exec 9>"$kcache/.lock"
  flock 9 # one fetch at a time; a concurrent run waits, then finds it done
  if [ ! -f "$kdir/.complete" ]; then
    fetch_kernel
    # Keep the two most recently fetched kernels.
    ls -dt "$kcache"/*/ | tail -n +3 | while read -r old; do e2e_log "pruning $old"; rm -rf "$old"; done
  fi
  exec 9>&-
fi
kver=$(cat "$kdir/kver")
t_kernel=$(e2e_now)

# ---- kernel into OUTDIR -----------------------------------------------------
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
if [ -n "$want_vmlinux" ] && [ -f "$kdir/vmlinux" ]; then kname=vmlinux; else kname=vmlinuz; fi
kernel=$outdir/$kname
if ! cmp -s "$kdir/$kname" "$kernel"; then
  cp "$kdir/$kname" "$kernel.tmp" && mv "$kernel.tmp" "$kernel"
fi

# ---- initramfs ----------------------------------------------------------------
# module_order M...: M and their dependencies, dependencies first, once each.
declare -A seen=()
order=()
visit() {
  local m=$1 d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  [ -f "$kdir/modules/$m.ko" ] || { e2e_log "warning: $m.ko not cached"; return 0; }
  for d in $(cat "$kdir/modules/$m.deps"); do visit "$d"; done
  order+=("$m")
}
visit virtio_pci
visit virtio_console
if [ -n "$vsock" ]; then visit vmw_vsock_virtio_transport; fi

# The guest's IMA policy. First matching rule wins. Pseudo filesystems are not
# measured (as in the tcb policy), nor ramfs, which /init uses as scratch
# space on /run; rootfs (tmpfs, the initramfs) and devtmpfs are measured,
# which is the point. Comment lines are dropped before it goes in.
policy='# proc
dont_measure fsmagic=0x9fa0
# sysfs
dont_measure fsmagic=0x62656572
# debugfs
dont_measure fsmagic=0x64626720
# securityfs (reading the measurement lists)
dont_measure fsmagic=0x73636673
# devpts
dont_measure fsmagic=0x1cd1
# ramfs (/run)
dont_measure fsmagic=0x858458f6
# cgroup, cgroup2
dont_measure fsmagic=0x27e0eb
dont_measure fsmagic=0x63677270
# every program executed, every file root opens for reading
measure func=BPRM_CHECK
measure func=FILE_CHECK mask=MAY_READ uid=0
'

# stage NAME DIR: lay out the initramfs tree of guest NAME in DIR.
stage() {
  local name=$1 r=$2 a i applet
  mkdir -p "$r"/{bin,sbin,dev,proc,sys,run,tmp,root,etc/tpmmux-e2e,lib/modules,opt/"$name"/{bin,etc}}
  chmod 1777 "$r/tmp"
  cp "$busybox" "$r/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$r/bin/$applet"
  done
  install -m 0755 "$here/init.sh" "$r/init"
  for m in "${order[@]}"; do cp "$kdir/modules/$m.ko" "$r/lib/modules/"; done
  printf '%s.ko\n' "${order[@]}" >"$r/lib/modules/load-order"
  printf '%s' "$policy" | grep -v '^#' >"$r/etc/tpmmux-e2e/ima-policy"
  echo "$name" >"$r/etc/tpmmux-e2e/name"
  echo "$agent_args" >"$r/etc/tpmmux-e2e/agent-args"
  # Guest-specific programs and data: distinct paths and contents per NAME.
  printf 'guest=%s\nsecret=%s\n' "$name" "$(printf '%s' "$name" | sha256sum | cut -c1-16)" >"$r/opt/$name/etc/guest.conf"
  for i in 1 2 3; do
    cat >"$r/opt/$name/bin/tool-$i" <<EOF
#!/bin/sh
# tool $i of guest $name
read -r line </opt/$name/etc/guest.conf
echo "$name tool-$i ran (\$line)"
EOF
    chmod 0755 "$r/opt/$name/bin/tool-$i"
  done
  # An ELF program too: busybox with the name appended (same code, new digest;
  # busybox treats argv[0] "busybox*" as its own name, so it runs).
  { cat "$busybox"; printf '\ntpmmux-e2e guest %s\n' "$name"; } >"$r/opt/$name/bin/busybox-$name"
  chmod 0755 "$r/opt/$name/bin/busybox-$name"
  if [ -n "$payload" ]; then install -m 0755 "$payload" "$r/sbin/tpmmux-agent"; fi
  for a in "${adds[@]}"; do
    mkdir -p "$r$(dirname "${a#*:}")"
    cp "${a%%:*}" "$r${a#*:}"
  done
  # /dev/console must exist in the cpio or init starts without a console.
  if [ "$(id -u)" = 0 ]; then mknod -m 0600 "$r/dev/console" c 5 1; fi
}

# pack DIR OUT: deterministic newc cpio (sorted, fixed mtimes, uid/gid 0).
pack() {
  local r=$1 out=$2
  find "$r" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  (cd "$r" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) >"$out.tmp"
  if [ -n "$gzip" ]; then gzip -n -6 <"$out.tmp" >"$out.tmp.gz" && mv "$out.tmp.gz" "$out.tmp"; fi
  mv "$out.tmp" "$out"
}

envfile=$outdir/guest.env
{
  printf 'KERNEL=%q\n' "$kernel"
  printf 'CMDLINE=%q\n' "$E2E_CMDLINE"
  printf 'KERNEL_PKG=%q\n' "$(basename "$kdir")"
} >"$envfile.tmp"
for name in "${names[@]}"; do
  stagedir=$(mktemp -d "$outdir/.stage-$name.XXXXXX")
  stage "$name" "$stagedir"
  pack "$stagedir" "$outdir/initrd-$name.img"
  rm -rf "$stagedir"
  var=INITRD_$(echo "$name" | tr '.-' '__')
  printf '%s=%q\n' "$var" "$outdir/initrd-$name.img" >>"$envfile.tmp"
  e2e_log "built $outdir/initrd-$name.img ($(stat -c %s "$outdir/initrd-$name.img") bytes, sha256 $(sha256sum "$outdir/initrd-$name.img" | cut -c1-16))"
done
mv "$envfile.tmp" "$envfile"
echo "$E2E_CMDLINE" >"$outdir/cmdline"

e2e_log "kernel $kernel ($(basename "$kdir"), $kver)"
e2e_log "cmdline: $E2E_CMDLINE"
e2e_log "done in $(e2e_elapsed "$t0")s (kernel cache $(e2e_elapsed "$t0" "$t_kernel")s)"
cat "$envfile"
