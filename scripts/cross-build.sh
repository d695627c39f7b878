#!/usr/bin/env bash
# Release binaries for ARM gateways, and a smoke test of the aarch64 one under qemu.
#
#   scripts/cross-build.sh                 # both targets + qemu smoke test
#   scripts/cross-build.sh aarch64         # one target (aarch64 | armv7)
#   SKIP_SMOKE=1 scripts/cross-build.sh    # no qemu
#
# Installs what it needs on a fresh Debian machine (root or sudo): the rustup targets, Debian's cross
# gcc (linker and C compiler for ring, the rustls crypto backend) and qemu-user. The linkers are set
# through CARGO_TARGET_<TRIPLE>_LINKER here, not in a committed .cargo/config.toml, so CI and native
# builds are unaffected. TLS is rustls: the script fails if openssl-sys is in the dependency tree.
#
# Output: $CARGO_TARGET_DIR (default ./target)/<triple>/release/fieldgate. Not run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A GCC=( [aarch64-unknown-linux-gnu]=aarch64-linux-gnu [armv7-unknown-linux-gnueabihf]=arm-linux-gnueabihf )
declare -A PKGS=( [aarch64-unknown-linux-gnu]="gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
                  [armv7-unknown-linux-gnueabihf]="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" )

targets=()
case "${1:-all}" in
  all) targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf) ;;
  aarch64) targets=(aarch64-unknown-linux-gnu) ;;
  armv7) targets=(armv7-unknown-linux-gnueabihf) ;;
  *) echo "usage: $0 [all|aarch64|armv7]" >&2; exit 64 ;;
esac

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=""
need_pkg() { # install Debian packages whose files are missing
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

echo "== checking: no OpenSSL in the dependency tree"
if cargo tree -i openssl-sys >/dev/null 2>&1; then
  echo "error: openssl-sys is a dependency; fieldgate must build with rustls only" >&2
  cargo tree -i openssl-sys >&2
  exit 1
fi

for t in "${targets[@]}"; do
  prefix=${GCC[$t]}
  # shellcheck disable=SC2086
  need_pkg ${PKGS[$t]}
  if ! rustup target list --installed | grep -qx "$t"; then
    echo "== rustup target add $t"
    rustup target add "$t"
  fi
  upper=$(echo "$t" | tr 'a-z-' 'A-Z_')
  lower=$(echo "$t" | tr '-' '_')
  export "CARGO_TARGET_${upper}_LINKER=${prefix}-gcc"
  export "CC_${lower}=${prefix}-gcc"
  export "AR_${lower}=${prefix}-ar"
  echo "== cargo build --release --locked --target $t"
  cargo build --release --locked --target "$t"
  bin="${CARGO_TARGET_DIR:-target}/$t/release/fieldgate"
  file "$bin" 2>/dev/null || ls -l "$bin"
done

if [ -z "${SKIP_SMOKE:-}" ] && [[ " ${targets[*]} " == *" aarch64-unknown-linux-gnu "* ]]; then
  need_pkg qemu-user
  bin="${CARGO_TARGET_DIR:-target}/aarch64-unknown-linux-gnu/release/fieldgate"
  echo "== smoke test: qemu-aarch64 $bin check --config config/fieldgate.example.toml"
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" --version
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" check --config config/fieldgate.example.toml
  echo "smoke test passed"
fi
if [ -z "${SKIP_SMOKE:-}" ] && [[ " ${targets[*]} " == *" armv7-unknown-linux-gnueabihf "* ]]; then
  need_pkg qemu-user
  bin="${CARGO_TARGET_DIR:-target}/armv7-unknown-linux-gnueabihf/release/fieldgate"
  echo "== smoke test: qemu-arm $bin check --config config/fieldgate.example.toml"
  qemu-arm -L /usr/arm-linux-gnueabihf "$bin" check --config config/fieldgate.example.toml
  echo "smoke test passed (armv7)"
fi
