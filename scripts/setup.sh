#!/usr/bin/env bash
# Installs the Debian packages tpmmux needs, only those missing, so it is
# quick on a machine that has them.
#   scripts/setup.sh demo   what the demo needs (cgo build of the TPM simulator)
#   scripts/setup.sh test   what the tests need (adds swtpm, tpm2-tools and QEMU,
#                           which the real-QEMU tests use and CI=true requires)
#   scripts/setup.sh ovmf   what the UEFI measured-boot test needs (QEMU, OVMF,
#                           GRUB's EFI modules, mtools, dosfstools, sfdisk;
#                           scripts/e2e/build-uefi-disk.sh)
set -euo pipefail
want=(gcc libssl-dev)
case "${1:-test}" in
  demo) ;;
  test) want+=(swtpm swtpm-tools tpm2-tools qemu-system-x86) ;;
  ovmf) want+=(qemu-system-x86 ovmf grub-efi-amd64-bin grub-common mtools dosfstools fdisk busybox-static) ;;
  *) echo "usage: $0 demo|test|ovmf" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { echo "setup: Go 1.26 is required (https://go.dev/dl)" >&2; exit 1; }
