#!/usr/bin/env bash
# Vendored verbatim (below this header) from ../shared/recipes/setup-rust-web-cross.sh (see
# ../shared/recipes/cross-arm.md), so the repo builds without shared/. Run it through
# cross/toolchain.sh, which skips it when the toolchain is already in place.
# Private Debian rustc-web 1.96 toolchain (x86_64 host) + aarch64/armv7 std, cross linkers, qemu-user.
# Does NOT install rustc-web/cargo-web as packages (they Conflict with rustup); only extracts them.
set -euo pipefail
V=1.96.0+dfsg1-1~deb12u2          # must be the SAME version for host rustc and every target std
ROOT=${ROOT:-/opt/rust-web}        # toolchain ends up in $ROOT/usr/{bin,lib/rustlib/<triple>}
WORK=${WORK:-/tmp/rust-web-debs}   # scratch: debs + private apt lists
# Pinned hash of the armhf std .deb (used only if the armhf apt index can't be fetched/verified).
ARMHF_SHA256=b9f9dd1d03a903680f918cb2bba00a2a3d76558545d5e6a8061072ab461bb989

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# runtime libs that the extracted rustc/cargo need + cross C toolchains + qemu-user (no binfmt needed)
apt-get install -y -qq --no-install-recommends \
  libllvm22 libgit2-1.5 patchelf \
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
  qemu-user >/dev/null

mkdir -p "$WORK"/{amd64,arm64,armhf} "$ROOT"
# 1) host toolchain (amd64)
(cd "$WORK/amd64" && apt-get download -q \
   rustc-web=$V cargo-web=$V libstd-rust-web-dev=$V libstd-rust-web-1.96=$V)
# 2) target std rlibs via a private, single-arch apt list (no dpkg --add-architecture)
for a in arm64 armhf; do
  o="-oAPT::Architecture=$a -oAPT::Architectures=$a -oDir::State::Lists=$WORK/lists-$a -oDir::Cache=$WORK/cache-$a"
  mkdir -p "$WORK/lists-$a/partial" "$WORK/cache-$a"
  apt-get $o update -qq || echo "WARN: apt-get update for $a exited $? (see README: armhf security index mismatch)"
  if ! (cd "$WORK/$a" && apt-get $o download -q libstd-rust-web-dev=$V); then
    [ "$a" = armhf ] || exit 1
    # Fallback: fetch the exact .deb from the security pool with apt's own downloader, hash-checked.
    /usr/lib/apt/apt-helper download-file \
      "http://deb.debian.org/debian-security/pool/updates/main/r/rustc-web/libstd-rust-web-dev_${V}_armhf.deb" \
      "$WORK/armhf/libstd-rust-web-dev_${V}_armhf.deb" "SHA256:$ARMHF_SHA256"
  fi
done
for d in "$WORK"/amd64/*.deb "$WORK"/arm64/*.deb "$WORK"/armhf/*.deb; do
  [ "$(dpkg-deb -f "$d" Version)" = "$V" ] || { echo "version mismatch: $d"; exit 1; }
  dpkg-deb -x "$d" "$ROOT"
done
# 3) make rustc/rustdoc find librustc_driver (lives in usr/lib/x86_64-linux-gnu) without LD_LIBRARY_PATH
for b in rustc rustdoc; do patchelf --set-rpath '$ORIGIN/../lib/x86_64-linux-gnu' "$ROOT/usr/bin/$b"; done

"$ROOT/usr/bin/rustc" -V
"$ROOT/usr/bin/cargo" -V
ls "$ROOT/usr/lib/rustlib"
