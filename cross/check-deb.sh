#!/usr/bin/env bash
# Checks the edge-agent .deb packages: control fields and dependencies against the binary,
# contents (dpkg-deb -c), conffiles, maintainer scripts, the systemd unit (systemd-analyze
# verify and an offline security score), the packaged binary and config under qemu, lintian,
# and a whole install / conffile-kept upgrade / remove / purge cycle with dpkg in a scratch root
# (maintainer scripts run chrootless with DPKG_ROOT; the host's users and units are untouched).
#
# Usage: bash cross/check-deb.sh [PKG.deb ...]
#   Without arguments: (re)builds the packages of $CROSS_CI_TARGETS (default "aarch64"; e.g.
#   "aarch64 armv7") with `cross/build.sh <targets> --deb --no-bridge` (incremental: seconds
#   when nothing changed) and checks those.
# Prints one line per check and ends with "check-deb: N passed, M failed"; exit 1 on a failure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

debs=("$@")
if [ ${#debs[@]} -eq 0 ]; then
  read -r -a ci_targets <<<"${CROSS_CI_TARGETS:-aarch64}"
  bash "$REPO/cross/build.sh" "${ci_targets[@]}" --deb --no-bridge
  for t in "${ci_targets[@]}"; do
    debs+=("$DIST"/edge-agent_*_"$(debarch_of "$(triple_of "$t")")".deb)
  done
fi

passed=0
failed=0
ok() { passed=$((passed + 1)); printf '  ok    %s\n' "$*"; }
bad() { failed=$((failed + 1)); printf '  FAIL  %s\n' "$*"; }
check() { # check "description" cmd...
  local what=$1
  shift
  local out
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what"; printf '%s\n' "$out" | sed 's/^/        /' | tail -20; fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The newest version in cross/debian/changelog (lintian wants a changelog that names it).
changelog_version=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$REPO/cross/debian/changelog")

install_lintian() {
  command -v lintian >/dev/null && return 0
  local SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends lintian >/dev/null
}

# lintian tags accepted on purpose: no-manual-page (--help is the documentation),
# description-synopsis-starts-with-article (the synopsis is the crate's description),
# initial-upload-closes-no-bugs (not an upload to the Debian archive).
LINTIAN_ACCEPTED=no-manual-page,description-synopsis-starts-with-article,initial-upload-closes-no-bugs
lintian_clean() {
  local tags
  tags=$(lintian --no-tag-display-limit \
    --suppress-tags "$LINTIAN_ACCEPTED" "$1" 2>&1 | grep -E '^[EW]: ' || true)
  [ -z "$tags" ] || { echo "$tags"; return 1; }
}

check_one() {
  local deb=$1
  local name
  name=$(basename "$deb")
  local d=$work/${name%.deb}
  mkdir -p "$d/root" "$d/ctl"
  dpkg-deb -x "$deb" "$d/root"
  dpkg-deb -e "$deb" "$d/ctl"
  dpkg-deb -c "$deb" >"$d/contents"
  # "mode owner path" per entry, numeric owners as names.
  awk '{ o = $2; if (o == "0/0") o = "root/root"; print $1, o, $6 }' "$d/contents" >"$d/listing"
  echo "== $name"
  field() { dpkg-deb -f "$deb" "$1"; }
  local arch triple bin
  arch=$(field Architecture)
  case "$arch" in
    arm64) triple=aarch64-unknown-linux-gnu ;;
    armhf) triple=armv7-unknown-linux-gnueabihf ;;
    *) bad "Architecture is arm64 or armhf (got '$arch')"; return ;;
  esac
  bin=$d/root/usr/bin/edge-agent

  # --- control
  check "Package: edge-agent" test "$(field Package)" = edge-agent
  check "Version $(field Version) is the newest in cross/debian/changelog ($changelog_version)" \
    test "$(field Version)" = "$changelog_version"
  local need have
  need=$(glibc_needed "$bin")
  have=$(field Depends | sed -n 's/.*libc6 (>= \([0-9.]*\)).*/\1/p')
  check "Depends: libc6 (>= $have) covers the binary's newest symbol GLIBC_$need" \
    dpkg --compare-versions "${have:-0}" ge "$need"
  check "Depends names libgcc-s1 when the binary links libgcc_s.so.1" \
    sh -c "! readelf -d '$bin' | grep -q 'libgcc_s.so.1' || dpkg-deb -f '$deb' Depends | grep -q libgcc-s1"

  # --- contents: path and mode, all owned by root
  local want
  for want in \
    '-rwxr-xr-x root/root ./usr/bin/edge-agent' \
    '-rw-r--r-- root/root ./etc/edge-agent/edge-agent.toml' \
    '-rw-r--r-- root/root ./usr/lib/systemd/system/edge-agent.service' \
    '-rw-r--r-- root/root ./usr/lib/sysusers.d/edge-agent.conf' \
    '-rw-r--r-- root/root ./usr/share/doc/edge-agent/copyright' \
    '-rw-r--r-- root/root ./usr/share/doc/edge-agent/changelog.Debian.gz' \
    '-rw-r--r-- root/root ./usr/share/doc/edge-agent/README.md'; do
    set -- $want
    check "contains $3 ($1 $2)" grep -qxF -e "$want" "$d/listing"
  done
  check "nothing outside /usr, /etc (no files in /var, /lib, /opt)" \
    sh -c "! awk '{ print \$6 }' '$d/contents' | grep -vE '^\./(usr|etc)(/|$)|^\./$'"
  check "conffiles is exactly /etc/edge-agent/edge-agent.toml" \
    test "$(cat "$d/ctl/conffiles" 2>/dev/null)" = /etc/edge-agent/edge-agent.toml

  # --- maintainer scripts
  local s
  for s in postinst prerm postrm; do
    check "$s: present, executable, valid sh, #DEBHELPER# expanded" \
      sh -c "test -x '$d/ctl/$s' && sh -n '$d/ctl/$s' && ! grep -q '#DEBHELPER#' '$d/ctl/$s'"
  done
  check "postinst creates the user (systemd-sysusers), enables and (re)starts the unit" \
    sh -c "grep -q 'systemd-sysusers.*edge-agent.conf' '$d/ctl/postinst' &&
           grep -q 'deb-systemd-helper enable edge-agent.service' '$d/ctl/postinst' &&
           grep -q 'deb-systemd-invoke \$_dh_action edge-agent.service' '$d/ctl/postinst'"
  check "prerm stops the service only on remove (upgrades restart it in postinst)" \
    grep -q 'deb-systemd-invoke stop edge-agent.service' "$d/ctl/prerm"
  check "postrm deletes /var/lib/edge-agent only on purge" \
    sh -c "grep -A2 'if \[ \"\$1\" = \"purge\" \]' '$d/ctl/postrm' | grep -q 'rm -rf.*/var/lib/edge-agent'"

  # --- the binary and the default config, run under qemu-user
  check "binary is stripped ELF for $arch" \
    sh -c "file -b '$bin' | grep -q '$( [ "$arch" = arm64 ] && echo 'ARM aarch64' || echo 'ARM, EABI5')' && ! file -b '$bin' | grep -q 'not stripped'"
  check "binary is $(stat -c %s "$bin") bytes (< $MAX_AGENT_BYTES)" test "$(stat -c %s "$bin")" -lt "$MAX_AGENT_BYTES"
  local qemu
  qemu=$(qemu_of "$triple")
  check "edge-agent --version runs under ${qemu%% *}" sh -c "$qemu '$bin' --version | grep -q '^edge-agent '"
  check "packaged /etc/edge-agent/edge-agent.toml passes edge-agent check-config" \
    $qemu "$bin" check-config --config "$d/root/etc/edge-agent/edge-agent.toml"
  check "packaged config is the current config/edge-agent.toml with data_dir = /var/lib/edge-agent" \
    bash "$REPO/cross/gen-config.sh" --check "$d/root/etc/edge-agent/edge-agent.toml"

  # --- the systemd unit
  local unit=$d/root/usr/lib/systemd/system/edge-agent.service
  local directive
  for directive in Type=notify NotifyAccess=main WatchdogSec= Restart=on-failure \
    RestartPreventExitStatus=2 User=edge-agent StateDirectory=edge-agent \
    'ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/edge-agent.toml' \
    NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
    CapabilityBoundingSet= SystemCallFilter=@system-service WantedBy=multi-user.target; do
    check "unit: $directive" grep -q "^$directive" "$unit"
  done
  # verify resolves ExecStart on this host: point it at the extracted binary (it is not run).
  mkdir -p "$d/verify"
  sed "s#/usr/bin/edge-agent#$bin#g" "$unit" >"$d/verify/edge-agent.service"
  check "systemd-analyze verify edge-agent.service" \
    sh -c "out=\$(systemd-analyze verify --man=no '$d/verify/edge-agent.service' 2>&1); echo \"\$out\"; [ -z \"\$out\" ]"
  local score
  score=$(systemd-analyze security --offline=yes --root="$d/root" edge-agent.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for edge-agent.service: \([0-9.]*\).*/\1/p')
  check "systemd-analyze security: exposure ${score:-?} (10 = unprotected; want <= 2.0)" \
    awk -v s="${score:-99}" 'BEGIN { exit !(s <= 2.0) }'

  # --- lintian (Debian policy); tags accepted on purpose:
  if install_lintian; then
    check "lintian: no errors or warnings" lintian_clean "$deb"
  else
    bad "lintian could not be installed"
  fi

  lifecycle "$deb" "$d"
}

# install -> edit the conffile -> upgrade (kept) -> remove (config and store kept) -> purge.
lifecycle() {
  local deb=$1 d=$2
  if [ -d /run/systemd/system ]; then
    # The scripts would call the host's systemctl (they test /run/systemd/system); don't.
    echo "  SKIP  dpkg install/upgrade/purge cycle: this host runs systemd"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "  SKIP  dpkg install/upgrade/purge cycle: needs root"
    return
  fi
  local root=$d/dpkg-root
  mkdir -p "$root"/var/lib/dpkg/{info,updates,triggers} "$root/etc" "$root/var/log"
  touch "$root"/var/lib/dpkg/{status,available}
  dpkgr_cmd() {
    echo "dpkg --root=$root --log=$root/var/log/dpkg.log --force-script-chrootless" \
      "--force-architecture --force-depends --force-not-root"
  }
  dpkgr() { $(dpkgr_cmd) "$@"; }
  # "v2": the same package with a higher version, as an upgrade would bring.
  local v2=$d/v2.deb
  mkdir -p "$d/v2"
  dpkg-deb -R "$deb" "$d/v2"
  sed -i "s/^Version: .*/Version: $(dpkg-deb -f "$deb" Version).1/" "$d/v2/DEBIAN/control"
  dpkg-deb -b --root-owner-group "$d/v2" "$v2" >/dev/null

  local conf=$root/etc/edge-agent/edge-agent.toml
  check "dpkg -i: installs, runs postinst" dpkgr -i "$deb"
  check "postinst created system user edge-agent (nologin, home /var/lib/edge-agent)" \
    grep -q '^edge-agent:x:[0-9]*:[0-9]*:[^:]*:/var/lib/edge-agent:/usr/sbin/nologin$' "$root/etc/passwd"
  check "postinst enabled the unit (multi-user.target.wants)" \
    test -L "$root/etc/systemd/system/multi-user.target.wants/edge-agent.service"
  sed -i 's/^gateway_id = .*/gateway_id = "pi-hall-3"/' "$conf"
  echo '# local edit' >>"$conf"
  mkdir -p "$root/var/lib/edge-agent" && echo store >"$root/var/lib/edge-agent/db"
  check "upgrade to $(dpkg-deb -f "$v2" Version) succeeds" dpkgr -i "$v2"
  check "upgrade kept the edited conffile" \
    sh -c "grep -qx 'gateway_id = \"pi-hall-3\"' '$conf' && grep -qx '# local edit' '$conf'"
  check "dpkg -r: removes the binary" sh -c "$(dpkgr_cmd) -r edge-agent && ! test -e '$root/usr/bin/edge-agent'"
  check "remove kept the config and the store" sh -c "test -f '$conf' && test -f '$root/var/lib/edge-agent/db'"
  check "dpkg -P: purge removes the config, the store and the unit's enablement" \
    sh -c "$(dpkgr_cmd) -P edge-agent && ! test -e '$conf' && ! test -e '$root/var/lib/edge-agent' &&
           ! test -e '$root/etc/systemd/system/multi-user.target.wants/edge-agent.service'"
}

t0=$(date +%s)
for deb in "${debs[@]}"; do
  check_one "$deb"
done
log "TIME check-deb (${#debs[@]} packages): $(($(date +%s) - t0))s"
echo "check-deb: $passed passed, $failed failed"
[ "$failed" = 0 ]
