#!/usr/bin/env bash
# Builds a small UEFI-bootable disk image for measured-boot tests, without
# root or loop mounts: a GPT disk with one EFI system partition (FAT, made
# with mkfs.vfat and filled with mtools) that holds
#   EFI/BOOT/BOOTX64.EFI  a standalone GRUB (grub-mkstandalone) with the tpm
#                         module, so GRUB measures what it runs and loads
#                         (commands and the kernel command line into PCR 8,
#                         the kernel, the initrd and its config into PCR 9)
#   vmlinuz, initrd.img   the guest kernel (a bzImage: EFI stub) and initrd
# and a grub.cfg that boots them at once with CMDLINE. OVMF boots it from
# its removable-media path (-drive if=virtio or ide).
#
#   build-uefi-disk.sh OUT.img --kernel BZIMAGE --initrd INITRD [--cmdline CMDLINE]
#
#   --kernel BZIMAGE  the kernel (the cached vmlinuz of build-guest.sh; the
#                     unpacked vmlinux has no EFI stub)
#   --initrd INITRD   the initramfs
#   --cmdline CMDLINE the kernel command line (default: lib.sh's E2E_CMDLINE)
#
# Needs grub-efi-amd64-bin, mtools and dosfstools (scripts/setup.sh ovmf
# installs them) and fdisk's sfdisk. Volume id, GPT GUIDs and file times
# are fixed (SOURCE_DATE_EPOCH); grub-mkstandalone's image is not
# byte-reproducible, so neither is the disk, nor PCR 4 (GRUB's digest).
set -euo pipefail
E2E_PROG=build-uefi-disk.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

usage() { sed -n '/^#   build-uefi-disk.sh OUT.img/,/^#   --cmdline CMDLINE/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

out='' kernel='' initrd='' cmdline=$E2E_CMDLINE
while (($#)); do
  case "$1" in
    --kernel) kernel=${2:?--kernel BZIMAGE}; shift 2 ;;
    --initrd) initrd=${2:?--initrd INITRD}; shift 2 ;;
    --cmdline) cmdline=${2?--cmdline CMDLINE}; shift 2 ;;
    -h | --help) usage ;;
    -*) e2e_log "unknown option $1"; usage ;;
    *) [ -z "$out" ] || usage; out=$1; shift ;;
  esac
done
[ -n "$out" ] && [ -n "$kernel" ] && [ -n "$initrd" ] || usage
[ -f "$kernel" ] || e2e_die "--kernel $kernel: no such file"
[ -f "$initrd" ] || e2e_die "--initrd $initrd: no such file"
[[ "$cmdline" != *[\"\$\\\`]* ]] || e2e_die "--cmdline may not hold \", \$, \\ or \` (it goes into grub.cfg)"
grubdir=/usr/lib/grub/x86_64-efi
for t in grub-mkstandalone:grub-common mformat:mtools mcopy:mtools mkfs.vfat:dosfstools sfdisk:fdisk; do
  command -v "${t%%:*}" >/dev/null || e2e_die "${t%%:*} not found (Debian: ${t#*:}; scripts/setup.sh ovmf)"
done
[ -f "$grubdir/tpm.mod" ] || e2e_die "$grubdir/tpm.mod not found (Debian: grub-efi-amd64-bin; scripts/setup.sh ovmf)"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The kernel must start through its EFI stub, which hands the UEFI event
# log to the kernel: Debian 12's GRUB 2.06 does that with linuxefi and
# initrdefi (with its plain linux the kernel got no event log here); GRUB
# 2.12's linux does it unasked and has no linuxefi.
grub_linux=linux grub_initrd=initrd
if [ -f "$grubdir/linuxefi.mod" ]; then grub_linux=linuxefi grub_initrd=initrdefi; fi
# insmod tpm first: every later command, the kernel command line and every
# file GRUB loads is then measured.
cat >"$tmp/grub.cfg" <<EOF
insmod tpm
set timeout=0
echo 'tpmmux: grub loading the kernel'
$grub_linux (\$root)/vmlinuz $cmdline
$grub_initrd (\$root)/initrd.img
boot
EOF
# The memdisk's config finds the ESP (the partition with /vmlinuz) and
# runs the grub.cfg there, which GRUB measures like every file it reads.
cat >"$tmp/early.cfg" <<'EOF'
search --no-floppy --file --set=root /vmlinuz
configfile ($root)/grub.cfg
EOF
grub-mkstandalone --format=x86_64-efi --output="$tmp/BOOTX64.EFI" \
  --modules="tpm part_gpt fat search search_fs_file $grub_linux echo configfile normal" \
  --locales= --fonts= --themes= \
  "boot/grub/grub.cfg=$tmp/early.cfg" >/dev/null 2>"$tmp/grub.err" ||
  { cat "$tmp/grub.err" >&2; e2e_die "grub-mkstandalone failed"; }

# The ESP: FAT sized for its files plus slack, in MiB.
bytes=$(($(stat -c %s "$kernel") + $(stat -c %s "$initrd") + $(stat -c %s "$tmp/BOOTX64.EFI")))
mib=$((bytes / 1048576 + 8))
((mib >= 34)) || mib=34 # FAT32 wants 65525 clusters: 34 MiB with 512-byte clusters
esp="$tmp/esp.img"
truncate -s "${mib}M" "$esp"
mkfs.vfat -F 32 -n TPMMUX-ESP -i 7e570000 "$esp" >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT
cp "$kernel" "$tmp/vmlinuz"
cp "$initrd" "$tmp/initrd.img"
touch -d "@$SOURCE_DATE_EPOCH" "$tmp/BOOTX64.EFI" "$tmp/grub.cfg" "$tmp/vmlinuz" "$tmp/initrd.img"
mcopy -i "$esp" -m "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" -m "$tmp/grub.cfg" "$tmp/vmlinuz" "$tmp/initrd.img" ::/

# The disk: GPT, the ESP at 1 MiB, 1 MiB spare at the end for the backup GPT.
rm -f "$out"
truncate -s "$((mib + 2))M" "$out"
sfdisk --quiet --no-reread --no-tell-kernel "$out" <<EOF
label: gpt
label-id: 7E5A0000-0000-4000-8000-000000000001
first-lba: 2048
start=2048, size=$((mib * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=7E5A0000-0000-4000-8000-000000000002, name="ESP"
EOF
dd if="$esp" of="$out" bs=1M seek=1 conv=notrunc status=none
e2e_log "wrote $out (${mib} MiB ESP: GRUB with tpm, vmlinuz, initrd.img)"
