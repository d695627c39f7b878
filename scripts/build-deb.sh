#!/usr/bin/env bash
# Build the Debian package: target/debian/fieldgate_<version>-1_<arch>.deb.
#
#   scripts/build-deb.sh                                  # native (amd64 here)
#   scripts/build-deb.sh --target aarch64-unknown-linux-gnu   # arm64 (run scripts/cross-build.sh aarch64 first
#                                                         # once: it installs the cross toolchain)
#
# Installs cargo-deb if missing (`cargo install cargo-deb --locked`), builds the release binary and the
# package from [package.metadata.deb] in Cargo.toml, and lists its contents. Install on a gateway with
# `apt install ./fieldgate_*.deb`. Not run by .ci/run. `scripts/verify-minimal.sh PACKAGE.deb` installs
# it on a minimal Debian 12 (debootstrap minbase) and runs `systemd-analyze verify` on its unit there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked
fi
if ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "error: dpkg-deb is missing (a Debian or Ubuntu machine is needed)" >&2
  exit 1
fi

target=""
if [ "${1:-}" = "--target" ] && [ -n "${2:-}" ]; then
  target=$2
  prefix=""
  case "$target" in
    aarch64-unknown-linux-gnu) prefix=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) prefix=arm-linux-gnueabihf ;;
  esac
  if [ -n "$prefix" ]; then
    upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
    lower=$(echo "$target" | tr '-' '_')
    export "CARGO_TARGET_${upper}_LINKER=${prefix}-gcc" "CC_${lower}=${prefix}-gcc" "AR_${lower}=${prefix}-ar"
  fi
fi

echo "== cargo deb ${target:+--target $target}"
out=$(cargo deb --locked ${target:+--target "$target"} | tail -n 1)
echo "$out"
echo "== dpkg-deb -I / -c"
dpkg-deb -I "$out"
dpkg-deb -c "$out"
