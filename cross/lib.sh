# Shared settings and helpers for the cross/ scripts (sourced, not run).
#
# Everything heavy lives outside the clone so repeated runs on one machine rebuild little:
#   toolchain      /opt/rust-web/usr            (Debian rustc-web + ARM std; cross/toolchain.sh)
#   ARM target dir $HOME/.cache/edge-pipeline/target-arm           (ARM_TARGET_DIR)
#   host target    $HOME/.cache/edge-pipeline/target               (tests/run.sh's, reused for e2e)
#   tools          $HOME/.cache/edge-pipeline/tools/bin            (cargo-deb)
#   zig            $HOME/.cache/edge-pipeline/zig-venv             (cargo-zigbuild, glibc 2.31)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${EDGE_CACHE:-$HOME/.cache/edge-pipeline}
RUST_WEB=${RUST_WEB:-/opt/rust-web/usr}
ARM_TARGET_DIR=${ARM_TARGET_DIR:-$CACHE/target-arm}
HOST_TARGET_DIR=${HOST_TARGET_DIR:-${CARGO_TARGET_DIR:-$CACHE/target}}
DIST=${DIST:-$ARM_TARGET_DIR/dist}
TOOLS=$CACHE/tools
ZIG_VENV=$CACHE/zig-venv
# 2 cores shared with other builders: keep cargo's parallelism low unless told otherwise.
JOBS=${CROSS_JOBS:-2}
CARGO_DEB_VERSION=3.8.0
CARGO_ZIGBUILD_VERSION=0.24.1
# Cargo feature flags of the gateway build of edge-agent (what the .deb ships and the ARM tests
# run): no `demo-alias` (a gateway has no demo beside the agent to run).
read -r -a AGENT_FEATURES <<<"${EDGE_AGENT_FEATURES:---no-default-features}"
# Target size of the stripped agent (issue 6): fail the build above this.
MAX_AGENT_BYTES=${MAX_AGENT_BYTES:-$((8 * 1024 * 1024))}

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# aarch64|arm64 -> Rust triple; armv7|armhf -> Rust triple.
triple_of() {
  case "$1" in
    aarch64 | arm64 | aarch64-unknown-linux-gnu) echo aarch64-unknown-linux-gnu ;;
    armv7 | armhf | armv7-unknown-linux-gnueabihf) echo armv7-unknown-linux-gnueabihf ;;
    *) echo "unknown target '$1' (aarch64 or armv7)" >&2; return 2 ;;
  esac
}
# Rust triple -> Debian architecture.
debarch_of() {
  case "$1" in
    aarch64-*) echo arm64 ;;
    armv7-*) echo armhf ;;
    *) echo "no Debian arch for $1" >&2; return 2 ;;
  esac
}
# Rust triple -> qemu-user command line that runs one of its binaries.
qemu_of() {
  case "$1" in
    aarch64-*) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
    armv7-*) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
  esac
}

# The cross toolchain first on PATH (Debian rustc-web 1.96 with the ARM std).
use_cross_toolchain() {
  export PATH="$RUST_WEB/bin:$PATH"
}

# cargo --locked once the workspace has a lockfile (it must stay resolvable by both compilers).
locked_flag() {
  if [ -f "$REPO/Cargo.lock" ]; then echo --locked; fi
}

log() { printf '[cross] %s\n' "$*"; }

# `timed LABEL cmd...`: runs cmd, then prints one grep-able line:
#   [cross] TIME <label>: <seconds>s (ok|FAILED rc=N)
# and returns cmd's exit code. The lines also go to $TIMINGS_FILE when set.
timed() {
  local label=$1
  shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$@" || rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local line
  if [ "$rc" = 0 ]; then line="TIME $label: ${secs}s (ok)"; else line="TIME $label: ${secs}s (FAILED rc=$rc)"; fi
  log "$line"
  if [ -n "${TIMINGS_FILE:-}" ]; then echo "$line" >>"$TIMINGS_FILE"; fi
  return "$rc"
}

# Highest GLIBC_x.y symbol version an ELF file needs (arch-independent: readelf -V).
glibc_needed() {
  readelf -V -W "$1" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1
}

# cargo-deb, pinned, installed once into the cache (about 45 s to compile on 2 cores).
ensure_cargo_deb() {
  if [ -x "$TOOLS/bin/cargo-deb" ] &&
    "$TOOLS/bin/cargo-deb" --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    :
  else
    log "installing cargo-deb $CARGO_DEB_VERSION into $TOOLS (once)"
    # The machine's own (rustup) cargo builds host tools; -j keeps it polite.
    env PATH="$(strip_rust_web_path)" cargo install cargo-deb --version "$CARGO_DEB_VERSION" \
      --locked -j "$JOBS" --root "$TOOLS" --quiet
  fi
  export PATH="$TOOLS/bin:$PATH"
}

# cargo-zigbuild (and zig) from PyPI in a private venv, for the glibc 2.31 build.
ensure_zigbuild() {
  if ! [ -x "$ZIG_VENV/bin/cargo-zigbuild" ]; then
    log "installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION (PyPI, brings zig) into $ZIG_VENV (once)"
    python3 -m venv "$ZIG_VENV"
    "$ZIG_VENV/bin/pip" install -q "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
  fi
  export PATH="$ZIG_VENV/bin:$PATH"
}

# PATH without the rust-web toolchain (for host tools built by the machine's rustup cargo).
strip_rust_web_path() {
  local IFS=: out="" p
  for p in $PATH; do
    [ "$p" = "$RUST_WEB/bin" ] || out="${out:+$out:}$p"
  done
  echo "$out"
}
