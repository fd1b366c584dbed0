#!/usr/bin/env bash
# Writes the .deb's default config, /etc/edge-agent/edge-agent.toml: config/edge-agent.toml (the
# repo's example) with `data_dir = "/var/lib/edge-agent"` (the unit's StateDirectory) and a
# header. cross/build.sh runs it before packaging, into the target dir next to the binary
# (the asset target/release/edge-agent.toml in edge-agent/Cargo.toml), so the package always
# carries the current example. `--check FILE` instead compares FILE (e.g. a packaged copy)
# with what would be generated.
#
# Usage: bash cross/gen-config.sh OUT        |   bash cross/gen-config.sh --check FILE
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$REPO/config/edge-agent.toml
mode=write
if [ "${1:-}" = --check ]; then mode=check; shift; fi
DST=${1:?usage: gen-config.sh OUT | gen-config.sh --check FILE}

[ -f "$SRC" ] || { echo "gen-config: $SRC missing" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
python3 - "$SRC" "$tmp" <<'PY'
import re, sys, tomllib
src, out = sys.argv[1], sys.argv[2]
text = open(src, encoding="utf-8").read()
header = (
    "# /etc/edge-agent/edge-agent.toml: the edge-agent service's config (a dpkg conffile: your\n"
    "# edits are kept on upgrade). Generated from the repo's config/edge-agent.toml by\n"
    "# cross/gen-config.sh when the package was built; the only change is data_dir, the\n"
    "# systemd unit's StateDirectory.\n"
    "# After editing: `edge-agent check-config --config /etc/edge-agent/edge-agent.toml`,\n"
    "# then `systemctl restart edge-agent`.\n"
    "#\n"
    "# To accept devices from the network rather than only from this machine, set\n"
    "# [broker.embedded] listen = \"0.0.0.0:1883\" (the endpoint has no authentication: keep it\n"
    "# on a trusted device network).\n\n"
)
line = 'data_dir = "/var/lib/edge-agent"'
# data_dir is a top-level key: it must come before the first [table] header.
first_table = re.search(r"^\s*\[", text, re.M)
top = text[: first_table.start()] if first_table else text
rest = text[len(top):]
if re.search(r"^data_dir\s*=.*$", top, re.M):
    top = re.sub(r"^data_dir\s*=.*$", line, top, count=1, flags=re.M)
else:
    top = top.rstrip("\n") + ("\n" if top.strip() else "") + line + "\n\n"
result = header + top + rest
cfg = tomllib.loads(result)
want = tomllib.loads(text)
want["data_dir"] = "/var/lib/edge-agent"
assert cfg == want, "generated config differs from the example beyond data_dir"
open(out, "w", encoding="utf-8").write(result)
PY
if [ "$mode" = check ]; then
  if ! diff -u "$DST" "$tmp"; then
    echo "gen-config: $DST is not config/edge-agent.toml with the packaged data_dir (stale build?)" >&2
    exit 1
  fi
  echo "gen-config: $DST is config/edge-agent.toml with data_dir = /var/lib/edge-agent"
else
  mkdir -p "$(dirname "$DST")"
  cp "$tmp" "$DST"
  echo "gen-config: wrote $DST"
fi
