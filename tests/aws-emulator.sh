#!/usr/bin/env bash
# The local AWS emulator (moto server) for the cloud-bridge tests and the demo.
#
#   source tests/aws-emulator.sh && aws_emulator_start   # installs (once), starts, exports
#                                                        # AWS_ENDPOINT_URL and test credentials
#   aws_emulator_stop                                    # stops the server this shell started
#   bash tests/aws-emulator.sh start|stop|install        # the same from a plain shell; `start`
#                                                        # prints the endpoint on stdout
#
# The venv lives outside the clone ($AWS_EMULATOR_VENV, default
# $HOME/.cache/edge-pipeline/venv-aws) so repeated runs on one machine reuse it; the install is
# skipped when the pinned moto version is already there. The port is free-picked unless
# AWS_EMULATOR_PORT is set. Recipe and caveats: shared/recipes/aws-emulator.md.

AWS_EMULATOR_VENV="${AWS_EMULATOR_VENV:-$HOME/.cache/edge-pipeline/venv-aws}"
AWS_EMULATOR_MOTO_VERSION="5.2.5"
AWS_EMULATOR_STATE="${AWS_EMULATOR_STATE:-$HOME/.cache/edge-pipeline/aws-emulator}"

aws_emulator_install() {
  if [ -x "$AWS_EMULATOR_VENV/bin/moto_server" ] &&
     [ "$("$AWS_EMULATOR_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" = "$AWS_EMULATOR_MOTO_VERSION" ]; then
    return 0
  fi
  echo "installing moto $AWS_EMULATOR_MOTO_VERSION into $AWS_EMULATOR_VENV" >&2
  mkdir -p "$(dirname "$AWS_EMULATOR_VENV")"
  python3 -m venv "$AWS_EMULATOR_VENV" >&2 || return 1
  "$AWS_EMULATOR_VENV/bin/pip" install -q --disable-pip-version-check \
    "moto[s3,sqs,dynamodb,events,cloudwatch,logs]==$AWS_EMULATOR_MOTO_VERSION" \
    'flask==3.1.3' 'flask-cors==6.0.2' >&2 || return 1
}

aws_emulator_start() {
  aws_emulator_install || return 1
  mkdir -p "$AWS_EMULATOR_STATE"
  local port="${AWS_EMULATOR_PORT:-}"
  if [ -z "$port" ]; then
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  fi
  # moto_server, with DynamoDB's conditional writes made atomic (see the script).
  "$AWS_EMULATOR_VENV/bin/python" "$(dirname "${BASH_SOURCE[0]}")/aws-emulator-serve.py" 127.0.0.1 "$port" \
    >"$AWS_EMULATOR_STATE/moto-$port.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$AWS_EMULATOR_STATE/moto-$port.pid"
  local i
  for i in $(seq 1 150); do
    if curl -sf "http://127.0.0.1:$port/moto-api/" >/dev/null 2>&1; then
      export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
      export AWS_EMULATOR_PID="$pid"
      export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
      export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
      export AWS_REGION="${AWS_REGION:-us-east-1}"
      echo "$AWS_ENDPOINT_URL"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.2
  done
  echo "moto server did not start; log: $AWS_EMULATOR_STATE/moto-$port.log" >&2
  kill "$pid" 2>/dev/null
  return 1
}

aws_emulator_stop() {
  local pid="${AWS_EMULATOR_PID:-}"
  if [ -z "$pid" ] && [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    local f="$AWS_EMULATOR_STATE/moto-${AWS_ENDPOINT_URL##*:}.pid"
    [ -f "$f" ] && pid="$(cat "$f")"
  fi
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  unset AWS_EMULATOR_PID
}

# Executed rather than sourced: a small CLI.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    install) aws_emulator_install ;;
    start)
      # Leaves the server running (detached) and prints the endpoint for the caller.
      aws_emulator_start
      disown "$AWS_EMULATOR_PID" 2>/dev/null || true ;;
    stop)
      AWS_ENDPOINT_URL="${2:-${AWS_ENDPOINT_URL:-}}" aws_emulator_stop ;;
    *) echo "usage: $0 install | start | stop [ENDPOINT]" >&2; exit 2 ;;
  esac
fi
