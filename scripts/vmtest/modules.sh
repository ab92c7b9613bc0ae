#!/usr/bin/env bash
# Puts kernel modules of the e2e guest kernel (scripts/e2e/build-guest.sh)
# that build-guest.sh does not keep, with everything they depend on, in a
# cache next to its kernel cache, and prints the directory.
#
#   modules.sh KERNEL_PKG MODULE...
#
#   KERNEL_PKG  the kernel package and version as build-guest.sh names its
#               cache entry (guest.env KERNEL_PKG), e.g.
#               linux-image-6.1.0-57-amd64_6.1.192-3
#   MODULE      a module name (underscores), e.g. vsock_loopback
#
# The directory holds <name>.ko (uncompressed) and <name>.deps (the names
# from the module's depends=, which the .deb has no modules.dep for) for
# each MODULE and each module it needs, recursively. The .deb is fetched
# with apt-get download when a module asked for is not cached yet (then the
# cached ones are taken again too).
#
# Environment: those of build-guest.sh (TPMMUX_E2E_CACHE).
set -euo pipefail
E2E_PROG=vmtest/modules.sh
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../e2e/lib.sh
. "$here/../e2e/lib.sh"

(($# >= 2)) || { sed -n '/^#   modules.sh/,/^#   MODULE /p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
kpkg_ver=$1
shift
[[ "$kpkg_ver" =~ ^linux-image-[A-Za-z0-9.+-]+_[A-Za-z0-9.+~:-]+$ ]] || e2e_die "bad kernel package '$kpkg_ver' (want NAME_VERSION as in guest.env KERNEL_PKG)"
kpkg=${kpkg_ver%%_*} kver_pkg=${kpkg_ver#*_}
want=("$@")
for m in "${want[@]}"; do [[ "$m" =~ ^[a-z0-9_]+$ ]] || e2e_die "bad module name '$m'"; done

cache=$(e2e_cache_dir)/vmtest
dir=$cache/$kpkg_ver
have() {
  local m
  [ -f "$dir/.complete" ] || return 1
  for m in "${want[@]}"; do [ -f "$dir/$m.ko" ] || return 1; done
}

fetch() {
  local tmp x kroot f ko m d
  e2e_ensure_pkgs xz-utils
  if [ -d "$dir" ]; then
    for f in "$dir"/*.ko; do [ -e "$f" ] && want+=("$(basename "$f" .ko)"); done
  fi
  e2e_log "fetching $kpkg=$kver_pkg for modules ${want[*]}"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  id _apt >/dev/null 2>&1 && chown _apt "$tmp" 2>/dev/null || true
  (cd "$tmp" && apt-get download -qq "$kpkg=$kver_pkg") || { rm -rf "$tmp"; e2e_die "apt-get download $kpkg=$kver_pkg failed"; }
  x=$tmp/root
  dpkg -x "$tmp"/*.deb "$x"
  rm -f "$tmp"/*.deb
  kroot=$(ls -d "$x"/lib/modules/*/ | head -n1)
  mkdir -p "$tmp/m"
  declare -A done_=()
  get() { # get NAME: copy module NAME and, recursively, its dependencies
    local m=$1 f ko d
    [ -n "${done_[$m]:-}" ] && return 0
    done_[$m]=1
    f=$(find "$kroot" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -n1)
    [ -n "$f" ] || { rm -rf "$tmp"; e2e_die "module $m not in $kpkg (built in? see /boot/config)"; }
    ko=$tmp/m/$m.ko
    case "$f" in
      *.ko) cp "$f" "$ko" ;;
      *.ko.xz) xz -dc "$f" >"$ko" ;;
      *.ko.zst) e2e_ensure_pkgs zstd; zstd -qdc "$f" >"$ko" ;;
      *.ko.gz) gzip -dc "$f" >"$ko" ;;
      *) e2e_die "unknown module file $f" ;;
    esac
    tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ' >"$tmp/m/$m.deps"
    for d in $(cat "$tmp/m/$m.deps"); do get "$d"; done
  }
  for m in "${want[@]}"; do get "$m"; done
  touch "$tmp/m/.complete"
  rm -rf "$dir"
  mv "$tmp/m" "$dir"
  rm -rf "$tmp"
}

if ! have; then
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9
  have || fetch
  # Keep the entries of the two most recent kernels.
  ls -dt "$cache"/linux-image-*/ 2>/dev/null | tail -n +3 | while read -r old; do e2e_log "pruning $old"; rm -rf "$old"; done
  exec 9>&-
fi
echo "$dir"
