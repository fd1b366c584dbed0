# The power-cut filesystem for tests/powercut.rs: Debian's fuse3 (fusermount3) and mfusepy
# (pinned) in a venv outside the clone ($CUTFS_VENV, default
# $HOME/.cache/edge-pipeline/venv-cutfs), reused when it already holds that version.
# Usage: source tests/powercut/cutfs.sh; cutfs_install; export CUTFS_PYTHON="$(cutfs_python)"

CUTFS_VENV="${CUTFS_VENV:-$HOME/.cache/edge-pipeline/venv-cutfs}"
CUTFS_MFUSEPY_VERSION="3.1.1"

cutfs_install() {
  if ! command -v fusermount3 >/dev/null; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "installing fuse3 (Debian package)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends fuse3 >/dev/null
  fi
  if [ "$("$CUTFS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("mfusepy"))' 2>/dev/null)" = "$CUTFS_MFUSEPY_VERSION" ]; then
    return 0
  fi
  echo "installing mfusepy $CUTFS_MFUSEPY_VERSION into $CUTFS_VENV" >&2
  mkdir -p "$(dirname "$CUTFS_VENV")"
  python3 -m venv "$CUTFS_VENV" >&2
  "$CUTFS_VENV/bin/pip" install -q --disable-pip-version-check "mfusepy==$CUTFS_MFUSEPY_VERSION" >&2
}

cutfs_python() {
  echo "$CUTFS_VENV/bin/python"
}
