#!/usr/bin/env bash
# Release builds for ARM gateways, a size report and (optionally) the .deb packages.
#
#   bash cross/build.sh                      # edge-agent for aarch64 + armv7, cloud-bridge for aarch64
#   bash cross/build.sh --deb                # ... and edge-agent_<v>_arm64.deb / _armhf.deb
#   bash cross/build.sh aarch64 --deb        # one target only (aarch64 | armv7)
#   bash cross/build.sh --glibc 2.31 --deb   # for Raspberry Pi OS bullseye (glibc 2.31), via zig
#   bash cross/build.sh --no-bridge          # skip cloud-bridge
#
# Prepares the toolchain first (cross/toolchain.sh; a no-op when cached). Uses the workspace's
# [profile.release] (lto, codegen-units=1, strip, panic=abort); edge-agent is the gateway build,
# --no-default-features (no `demo-alias`; EDGE_AGENT_FEATURES overrides). Output: binaries and .debs in
# $DIST (default $HOME/.cache/edge-pipeline/target-arm/dist), the size report in
# $DIST/sizes.txt. Fails when a stripped edge-agent is larger than MAX_AGENT_BYTES (8 MiB).
# Smaller still: CARGO_PROFILE_RELEASE_OPT_LEVEL=s bash cross/build.sh ... (aarch64 agent
# 7.4 -> 5.7 MiB on 2026-11-26; measure ingest throughput before shipping that).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

targets=()
deb=0
bridge=1
glibc=""
while [ $# -gt 0 ]; do
  case "$1" in
    --deb) deb=1 ;;
    --no-bridge) bridge=0 ;;
    --glibc) glibc=${2:?--glibc needs a version, e.g. 2.31}; shift ;;
    --glibc=*) glibc=${1#--glibc=} ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$(triple_of "$1")") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

bash "$REPO/cross/toolchain.sh"
use_cross_toolchain
cd "$REPO"

target_dir=$ARM_TARGET_DIR
dist=$DIST
if [ -n "$glibc" ]; then
  # A separate target dir: zigbuild writes to the same target/<triple>/release paths.
  target_dir=$ARM_TARGET_DIR-glibc$glibc
  dist=$DIST/glibc$glibc
  timed "cargo-zigbuild ready" ensure_zigbuild
fi
mkdir -p "$dist"
export CARGO_TARGET_DIR=$target_dir

build() { # triple package: one package per cargo call (features are per invocation)
  local triple=$1 pkg=$2
  local args=(--release $(locked_flag) -j "$JOBS" -p "$pkg")
  # The gateway build of the agent: $AGENT_FEATURES (default --no-default-features, no demo alias).
  if [ "$pkg" = edge-agent ]; then args+=("${AGENT_FEATURES[@]}"); fi
  if [ -n "$glibc" ]; then
    cargo zigbuild "${args[@]}" --target "$triple.$glibc"
  else
    cargo build "${args[@]}" --target "$triple"
  fi
}

report=$dist/sizes.txt
: >"$report"
printf '%-32s %-13s %10s %8s %6s  %s\n' target binary bytes MiB glibc stripped | tee -a "$report"
over=0
for triple in "${targets[@]}"; do
  pkgs=(edge-agent)
  if [ "$bridge" = 1 ] && [[ $triple == aarch64-* ]]; then pkgs+=(cloud-bridge); fi
  for bin in "${pkgs[@]}"; do
    timed "release build $bin $triple${glibc:+ glibc $glibc}" build "$triple" "$bin"
    f=$target_dir/$triple/release/$bin
    bytes=$(stat -c %s "$f")
    stripped=yes
    file -b "$f" | grep -q 'not stripped' && stripped=NO
    printf '%-32s %-13s %10d %8.2f %6s  %s\n' "$triple" "$bin" "$bytes" \
      "$(awk -v b="$bytes" 'BEGIN { print b / 1048576 }')" "$(glibc_needed "$f")" "$stripped" | tee -a "$report"
    cp "$f" "$dist/$bin-$(debarch_of "$triple")"
    if [ "$bin" = edge-agent ] && [ "$bytes" -gt "$MAX_AGENT_BYTES" ]; then over=1; fi
  done
done
log "size report: $report"

# cloud-bridge as an AWS Lambda custom runtime on Graviton (arm64, provided.al2023: glibc 2.34,
# so the default build fits): a zip holding the binary as `bootstrap`, mode 0755.
bridge_bin=$target_dir/aarch64-unknown-linux-gnu/release/cloud-bridge
if [ "$bridge" = 1 ] && [ -f "$bridge_bin" ] && [[ " ${targets[*]} " == *" aarch64-unknown-linux-gnu "* ]]; then
  python3 - "$bridge_bin" "$dist/cloud-bridge-lambda-arm64.zip" <<'PY'
import sys, zipfile
src, out = sys.argv[1], sys.argv[2]
info = zipfile.ZipInfo("bootstrap", date_time=(2020, 1, 1, 0, 0, 0))
info.external_attr = 0o100755 << 16
info.compress_type = zipfile.ZIP_DEFLATED
with zipfile.ZipFile(out, "w") as z, open(src, "rb") as f:
    z.writestr(info, f.read())
PY
  log "Lambda (arm64, provided.al2023): $dist/cloud-bridge-lambda-arm64.zip ($(stat -c %s "$dist/cloud-bridge-lambda-arm64.zip") bytes)"
fi
if [ "$over" = 1 ]; then
  echo "edge-agent is larger than $MAX_AGENT_BYTES bytes (issue 6 target: stripped agent < 8 MB)" >&2
  exit 1
fi

if [ "$deb" = 1 ]; then
  timed "cargo-deb ready" ensure_cargo_deb
  variant=()
  if [ -n "$glibc" ]; then
    [ "$glibc" = 2.31 ] || { echo "--deb with --glibc: only the 2.31 (bullseye) variant is defined" >&2; exit 2; }
    variant=(--variant bullseye)
  fi
  for triple in "${targets[@]}"; do
    # The default config, generated from config/edge-agent.toml next to the binary.
    bash "$REPO/cross/gen-config.sh" "$target_dir/$triple/release/edge-agent.toml" >/dev/null
    # Only the package built now is left in $dist for this architecture (check-deb.sh globs).
    rm -f "$dist"/edge-agent_*_"$(debarch_of "$triple")".deb
    # --no-build: package exactly the binary built above (cargo-deb maps target/release/ to
    # $CARGO_TARGET_DIR/<triple>/release). --no-strip: the profile already stripped it, and
    # the host's strip can't handle ARM objects.
    timed "package .deb $(debarch_of "$triple")" \
      cargo deb -p edge-agent --no-build --no-strip --target "$triple" "${variant[@]}" \
      --output "$dist/" --quiet
  done
  ls -l "$dist"/*.deb
fi
