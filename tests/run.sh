#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first: mosquitto, the moto
# AWS emulator (tests/aws-emulator.sh), and the ARM cross toolchain (cross/toolchain.sh).
# Usage: bash tests/run.sh        (the README's test command; CI runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."

# Real MQTT peers for the end-to-end tests: mosquitto (broker) and mosquitto_pub (client).
need=()
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing ${need[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The package starts a system broker on :1883; the tests start their own on free ports.
  $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

# The local AWS emulator (moto, pinned) for the cloud-bridge tests; venv outside the clone.
# shellcheck source=tests/aws-emulator.sh
source tests/aws-emulator.sh
aws_emulator_start >/dev/null
trap aws_emulator_stop EXIT

# The power-cut filesystem (FUSE) for tests/powercut.rs.
# shellcheck source=tests/powercut/cutfs.sh
source tests/powercut/cutfs.sh
cutfs_install
CUTFS_PYTHON="$(cutfs_python)"
export CUTFS_PYTHON
"$CUTFS_PYTHON" tests/powercut/selfcheck.py

# The cloud tier's SAM template (cloud-bridge/deploy/template.yaml): cfn-lint and `sam validate
# --lint`, both pinned, each in a venv outside the clone (like the emulator's). Offline.
bash cloud-bridge/deploy/lint.sh

# Keep build artifacts outside the clone so repeated runs on one machine rebuild little.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edge-pipeline/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# The fuzz targets' bodies, so clippy reads them and the corpus replay tests run (fuzz/README.md).
fuzzing=(--features proto/fuzzing,engine/fuzzing,edge-agent/fuzzing)

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked "${fuzzing[@]}" -- -D warnings
# ARM gateways: the engine and agent suites for aarch64 under qemu-user, an end-to-end smoke
# test of the ARM binary, and the .deb checks (cross/README-install.md).
bash cross/test-arm.sh
bash cross/check-deb.sh

# Every fuzz target for 15 s from the committed corpus (fuzz/README.md): stable toolchain, no
# sanitizer; installs cargo-fuzz when missing. Its own target dir, shared by every checkout.
CARGO_TARGET_DIR="$HOME/.cache/edge-pipeline/target-fuzz" bash scripts/fuzz check 15

# Last, so the output ends with the test summary.
if cargo nextest --version >/dev/null 2>&1; then
  cargo build --workspace --locked --bins "${fuzzing[@]}"
  cargo nextest run --workspace --locked --no-fail-fast "${fuzzing[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${fuzzing[@]}"
fi
