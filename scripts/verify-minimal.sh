#!/usr/bin/env bash
# Install the Debian package on a minimal Debian 12 and check its unit there:
#
#   scripts/verify-minimal.sh target/debian/fieldgate_0.1.0-1_amd64.deb [ROOT]
#
# ROOT (default /tmp/fieldgate-minbase) is made once with `debootstrap --variant=minbase bookworm`
# (no procps, no systemd), then gets systemd without recommends, as a small gateway image would.
# The package is installed with apt, which must pull in every dependency the unit needs, and
# `systemd-analyze verify` (Debian 12's systemd 252, run inside ROOT) must find every command the
# unit runs: without the procps dependency it says `Command /bin/kill is not executable`.
#
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror: MIRROR, else the first
# `URIs:` of /etc/apt/sources.list.d/debian.sources. Not run by .ci/run (it downloads ~100 MB).
set -euo pipefail

deb=$(realpath "${1:?usage: $0 PACKAGE.deb [ROOT]}")
root=${2:-/tmp/fieldgate-minbase}
mirror=${MIRROR:-$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}

if [ ! -x "$root/usr/bin/apt-get" ]; then
  if [ -z "$mirror" ]; then
    echo "error: set MIRROR to a Debian mirror URL" >&2
    exit 1
  fi
  echo "== debootstrap --variant=minbase bookworm $root"
  debootstrap --variant=minbase bookworm "$root" "$mirror"
fi

mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
trap 'umount "$root/proc" 2>/dev/null || true' EXIT
cp /etc/resolv.conf "$root/etc/resolv.conf"

echo "== systemd (no recommends)"
chroot "$root" apt-get install -y --no-install-recommends systemd >/dev/null
cp "$deb" "$root/tmp/fieldgate.deb"
echo "== apt-get install ./$(basename "$deb")"
chroot "$root" apt-get install -y --no-install-recommends /tmp/fieldgate.deb
chroot "$root" dpkg-query -W -f '${Package} ${Version}: Depends: ${Depends}\n' fieldgate
echo "== systemd-analyze verify fieldgate.service ($(chroot "$root" systemctl --version | head -n 1))"
chroot "$root" systemd-analyze verify /usr/lib/systemd/system/fieldgate.service
echo "OK: every command of fieldgate.service is installed on a minimal Debian 12"
