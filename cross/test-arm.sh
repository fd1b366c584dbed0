#!/usr/bin/env bash
# CI step: the test suites on aarch64 under qemu-user, then the ARM agent end to end.
#
#   1. toolchain (cross/toolchain.sh: a check when cached, the recipe otherwise)
#   2. cargo test -p proto -p engine -p edge-agent --no-default-features --target aarch64-...
#      (built by Debian's rustc-web for aarch64, run by the runner in .cargo/config.toml)
#   3. the release aarch64 agent (cross/build.sh aarch64 --no-bridge: what the .deb ships)
#   4. smoke: the host-built e2e harness drives the ARM agent under qemu-aarch64 (EDGE_AGENT_BIN
#      is a wrapper script): mosquitto_pub -> embedded endpoint -> outbox, read back by the CLI
#   5. sd_notify: READY=1 / WATCHDOG=1 / STOPPING=1 from the ARM agent (cross/notify-smoke.py),
#      once the agent calls edge_agent::systemd (skipped with a notice before that)
#
# Every step prints "[cross] TIME <step>: <s>s"; the summary repeats them. ARM artifacts go to
# $ARM_TARGET_DIR ($HOME/.cache/edge-pipeline/target-arm), the host harness to
# $HOST_TARGET_DIR (tests/run.sh's target dir, so it is usually built already).
# Needs mosquitto-clients (tests/run.sh installs it). Usage: bash cross/test-arm.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"

TRIPLE=aarch64-unknown-linux-gnu
export TIMINGS_FILE
TIMINGS_FILE=$(mktemp)
trap 'rm -f "$TIMINGS_FILE"' EXIT
t_all=$(date +%s)

bash cross/toolchain.sh

arm_cargo() {
  env PATH="$RUST_WEB/bin:$PATH" CARGO_TARGET_DIR="$ARM_TARGET_DIR" cargo "$@"
}
# The gateway feature set ($AGENT_FEATURES: --no-default-features), as the .deb ships it; proto
# and engine have no default features to lose.
unit_tests=(test $(locked_flag) -j "$JOBS" --target "$TRIPLE" -p proto -p engine -p edge-agent "${AGENT_FEATURES[@]}")
failed=()
# A failing step is recorded and the later ones still run; the script fails at the end.
step() { # step LABEL cmd...
  timed "$@" || failed+=("$1")
}
step "aarch64 test build (proto, engine, edge-agent)" arm_cargo "${unit_tests[@]}" --no-run
# The labelled anomaly data set (3 seeds x 60k events) is the same f64 arithmetic on every
# target and takes ~100 s under qemu: it runs on the host; the detectors' unit tests run here.
step "aarch64 tests under qemu-aarch64" arm_cargo "${unit_tests[@]}" --no-fail-fast \
  -- --skip detectors_find_labelled_anomalies_on_three_seeds

bash cross/build.sh aarch64 --no-bridge
arm_bin=$ARM_TARGET_DIR/$TRIPLE/release/edge-agent
wrapper=$ARM_TARGET_DIR/edge-agent-qemu-aarch64
cat >"$wrapper" <<EOF
#!/bin/sh
# The aarch64 edge-agent under qemu-user (EDGE_AGENT_BIN for the e2e tests). exec: signals
# sent to this pid reach qemu, which passes them to the agent.
exec $(qemu_of "$TRIPLE") "$arm_bin" "\$@"
EOF
chmod +x "$wrapper"
log "ARM agent: $("$wrapper" --version) ($(file -b "$arm_bin" | cut -d, -f1-2))"

smoke() {
  local out
  out=$(mktemp)
  # The harness is a host program (the machine's own toolchain, the host target dir).
  env PATH="$(strip_rust_web_path)" CARGO_TARGET_DIR="$HOST_TARGET_DIR" EDGE_AGENT_BIN="$wrapper" \
    cargo test $(locked_flag) -j "$JOBS" -p e2e --test edge_ingest embedded 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  # A filter that matched no test would pass silently: insist that one ran.
  if [ "$rc" = 0 ] && ! grep -Eq 'test result: ok\. [1-9][0-9]* passed' "$out"; then
    echo "smoke: the filter 'embedded' ran no test" >&2
    rc=1
  fi
  rm -f "$out"
  return "$rc"
}
step "ARM smoke: e2e embedded ingest -> outbox (qemu-aarch64 agent)" smoke

if grep -rqs --include='*.rs' --exclude=systemd.rs 'notify_ready' edge-agent/src; then
  step "ARM sd_notify: READY / WATCHDOG / STOPPING" \
    python3 cross/notify-smoke.py config/edge-agent.toml $(qemu_of "$TRIPLE") "$arm_bin"
else
  log "SKIP sd_notify smoke: edge-agent does not call systemd::notify_ready yet"
fi

log "summary (aarch64 under qemu-user):"
sed 's/^/[cross]   /' "$TIMINGS_FILE"
log "TIME test-arm total: $(($(date +%s) - t_all))s"
if [ ${#failed[@]} -gt 0 ]; then
  log "FAILED: ${failed[*]}"
  exit 1
fi
