#!/usr/bin/env bash
# Prepares the ARM cross toolchain (idempotent): Debian's rustc-web 1.96 in /opt/rust-web with
# the aarch64 and armv7 std, the GNU cross linkers and qemu-user. Recipe:
# ../shared/recipes/cross-arm.md (vendored as cross/setup-rust-web-cross.sh). When everything
# is already in place it only checks (well under a second); otherwise it runs the recipe
# (about 25 s after apt's downloads; needs root for apt-get).
#
# Usage: bash cross/toolchain.sh [--force]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUST_WEB_VERSION=1.96.0

toolchain_ready() {
  "$RUST_WEB/bin/rustc" -V 2>/dev/null | grep -q "^rustc $RUST_WEB_VERSION " || return 1
  "$RUST_WEB/bin/cargo" -V >/dev/null 2>&1 || return 1
  local t
  for t in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    compgen -G "$RUST_WEB/lib/rustlib/$t/lib/libstd-*.rlib" >/dev/null || return 1
  done
  local c
  for c in aarch64-linux-gnu-gcc arm-linux-gnueabihf-gcc qemu-aarch64 qemu-arm readelf; do
    command -v "$c" >/dev/null || return 1
  done
  [ -e /usr/aarch64-linux-gnu/lib/libc.so.6 ] && [ -e /usr/arm-linux-gnueabihf/lib/libc.so.6 ]
}

setup() {
  if [ "${1:-}" != --force ] && toolchain_ready; then
    log "toolchain: cached ($("$RUST_WEB/bin/rustc" -V); aarch64 + armv7 std; qemu-user)"
    return 0
  fi
  local SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -E"
  log "toolchain: setting up $RUST_WEB (Debian rustc-web $RUST_WEB_VERSION + ARM std, cross gcc, qemu-user)"
  $SUDO env ROOT="${RUST_WEB%/usr}" bash "$REPO/cross/setup-rust-web-cross.sh" >"$CACHE/toolchain-setup.log" 2>&1 || {
    tail -30 "$CACHE/toolchain-setup.log" >&2
    return 1
  }
  toolchain_ready || { echo "toolchain still incomplete after the recipe; see $CACHE/toolchain-setup.log" >&2; return 1; }
  log "toolchain: ready ($("$RUST_WEB/bin/rustc" -V))"
}

mkdir -p "$CACHE"
timed "toolchain setup" setup "$@"
