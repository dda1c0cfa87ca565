#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages VIMS needs on the host, if any is missing.
# QEMU runs the bundled guest; the guest image itself is built from Debian packages fetched with
# `apt-get download` (see collector/guest), so apt's package lists must be current; the Debian guest
# (`vims guest build --image debian`) with mmdebstrap and mke2fs, and is reached with ssh. The attack
# scenarios use real tools (hydra, socat); REM-S's fleet store and its tests use PostgreSQL; the tests of
# REM-S's web console drive a real headless browser (chromium, chromium-driver). `vims attach
# libvirt:DOMAIN` is tested on libvirtd (scripts/libvirt-up.sh starts it); its Python binding builds
# against libvirt-dev with pkg-config; qemu-img makes the tests' disk overlays.
set -euo pipefail
packages=(python3-venv qemu-system-x86 bpftool xz-utils mmdebstrap openssh-client e2fsprogs hydra socat postgresql
          chromium chromium-driver
          libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config qemu-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo="sudo"; else
    [ ${#missing[@]} -eq 0 ] || { echo "error: missing packages ${missing[*]} and not root: install them" >&2; exit 2; }
  fi
fi
# apt-get download (guest build) needs package lists no older than a day.
lists=/var/lib/apt/lists
if [ ${#missing[@]} -gt 0 ] || [ -z "$(find "$lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
  $sudo apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
