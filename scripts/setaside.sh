# shellcheck shell=bash
# set_aside and put_back: the scripts that install, purge or replace
# /etc/tpmmux, /var/lib/tpmmux or /run/tpmmux (package-test.sh,
# host-steps.sh, e2e-migrate.sh) move whatever is there already (an
# operator's install, an interrupted run) out of the way for the run and put
# it back afterwards, so a test never purges or overwrites it. Sourced, not
# run; the caller defines say and die and sets SETASIDE_TAG (its own name).

SETASIDE_SAVED=()

# set_aside PATH: move PATH to PATH.set-aside-by-TAG.PID if it exists.
set_aside() {
  local p=$1 to
  [ -e "$p" ] || return 0
  to="$p.set-aside-by-${SETASIDE_TAG:?}.$$"
  mv "$p" "$to" || die "cannot set $p aside"
  SETASIDE_SAVED+=("$p")
  say "$p existed: set aside as $to until the test ends"
}

# put_back: remove what the run left at each set-aside path and move the
# original back. Call it from the EXIT trap.
put_back() {
  local p
  for p in "${SETASIDE_SAVED[@]}"; do
    rm -rf "$p"
    mv "$p.set-aside-by-${SETASIDE_TAG:?}.$$" "$p" && say "$p put back"
  done
}
