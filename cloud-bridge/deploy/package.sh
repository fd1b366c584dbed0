#!/usr/bin/env bash
# Builds the Lambda package template.yaml deploys (CodeUri build/cloud-bridge-lambda-arm64.zip):
# the cross build's zip (the cloud-bridge binary as `bootstrap`, `bash cross/build.sh aarch64`)
# plus the bridge's config (lambda/cloud-bridge.toml), the gateways' engine config and the
# device API keys file, each checked by `cloud-bridge check-config` first.
#
# Usage: bash cloud-bridge/deploy/package.sh [--zip CROSS_ZIP] [--engine-config FILE]
#          [--api-keys FILE] [--out FILE]
# Defaults: ~/.cache/edge-pipeline/target-arm/dist/cloud-bridge-lambda-arm64.zip,
# config/edge-agent.toml, an empty api-keys file (HTTP refuses every device until keys are
# added), cloud-bridge/deploy/build/cloud-bridge-lambda-arm64.zip.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
zip="${CARGO_TARGET_DIR_ARM:-$HOME/.cache/edge-pipeline/target-arm}/dist/cloud-bridge-lambda-arm64.zip"
engine="$root/config/edge-agent.toml"
keys=""
out="$here/build/cloud-bridge-lambda-arm64.zip"
while [ $# -gt 0 ]; do
  case "$1" in
    --zip) zip="$2"; shift 2 ;;
    --engine-config) engine="$2"; shift 2 ;;
    --api-keys) keys="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--zip F] [--engine-config F] [--api-keys F] [--out F]" >&2; exit 2 ;;
  esac
done
[ -f "$zip" ] || { echo "$zip: missing (run: bash cross/build.sh aarch64)" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$here/lambda/cloud-bridge.toml" "$stage/cloud-bridge.toml"
cp "$engine" "$stage/edge-agent.toml"
if [ -n "$keys" ]; then cp "$keys" "$stage/api-keys"; else : >"$stage/api-keys"; fi

# The host's cloud-bridge checks the packaged config as the Lambda will read it.
bridge="${CLOUD_BRIDGE_BIN:-}"
if [ -z "$bridge" ]; then
  bridge="$(command -v cloud-bridge || true)"
  [ -n "$bridge" ] || bridge="${CARGO_TARGET_DIR:-$root/target}/debug/cloud-bridge"
fi
if [ -x "$bridge" ]; then
  "$bridge" check-config --config "$stage/cloud-bridge.toml"
else
  echo "warning: no host cloud-bridge binary to check the config with (set CLOUD_BRIDGE_BIN)" >&2
fi

mkdir -p "$(dirname "$out")"
python3 - "$zip" "$stage" "$out" <<'PY'
import os, sys, zipfile
src, stage, out = sys.argv[1], sys.argv[2], sys.argv[3]
with zipfile.ZipFile(src) as z:
    boot = z.getinfo("bootstrap")
    data = z.read(boot)
tmp = out + ".tmp"
with zipfile.ZipFile(tmp, "w") as z:
    z.writestr(boot, data)
    for name in ("cloud-bridge.toml", "edge-agent.toml", "api-keys"):
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        with open(os.path.join(stage, name), "rb") as f:
            z.writestr(info, f.read())
os.replace(tmp, out)
PY
echo "Lambda package: $out ($(stat -c %s "$out") bytes)"
