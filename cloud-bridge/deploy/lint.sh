#!/usr/bin/env bash
# Checks template.yaml offline: cfn-lint (no errors, no warnings) and AWS SAM CLI's
# `sam validate --lint` (the SAM transform, then its cfn-lint). Both pinned, installed from PyPI
# into venvs under ~/.cache/edge-pipeline/ on first use (CI reuses them on the same machine).
# Usage: bash cloud-bridge/deploy/lint.sh       (tests/run.sh runs it)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$HOME/.cache/edge-pipeline"
CFN_LINT_VERSION=1.58.0
SAM_CLI_VERSION=1.170.0

venv() { # venv DIR PIP-SPEC BIN: installs PIP-SPEC into DIR unless DIR/bin/BIN runs
  local dir=$1 spec=$2 bin=$3
  if ! "$dir/bin/$bin" --version >/dev/null 2>&1; then
    echo "installing $spec into $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$spec" >&2
  fi
}

venv "$cache/venv-cfn-lint-$CFN_LINT_VERSION" "cfn-lint==$CFN_LINT_VERSION" cfn-lint
"$cache/venv-cfn-lint-$CFN_LINT_VERSION/bin/cfn-lint" "$here/template.yaml"
echo "cfn-lint $CFN_LINT_VERSION: $here/template.yaml: no errors or warnings"

venv "$cache/venv-sam-$SAM_CLI_VERSION" "aws-sam-cli==$SAM_CLI_VERSION" sam
# No AWS account is reached: validate needs a region and no credentials.
AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-eu-central-1}" SAM_CLI_TELEMETRY=0 \
  "$cache/venv-sam-$SAM_CLI_VERSION/bin/sam" validate --lint --template "$here/template.yaml"
