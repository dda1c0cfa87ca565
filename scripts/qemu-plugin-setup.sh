#!/usr/bin/env bash
# Installs QEMU 10 (Debian bookworm-backports) into a private prefix and builds the VIMS syscall
# plugin (collector/plugin/vims_syscall.c) against it. The system's QEMU is left alone: the prefix is
# ~/.cache/vims/qemu10 (VIMS_QEMU10 overrides), the plugin lands in ~/.cache/vims/plugin/.
# On a host whose own QEMU is 10 or newer (Debian 13), that QEMU is used and only the plugin is built.
# The plugin declares the few QEMU plugin API functions it uses itself, so no QEMU header is needed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${VIMS_CACHE:-$HOME/.cache/vims}"
prefix="${VIMS_QEMU10:-$cache/qemu10}"
outdir="$cache/plugin"
src="$here/collector/plugin/vims_syscall.c"
sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi

system_major() {
  command -v qemu-system-x86_64 >/dev/null || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

if [ "$(system_major)" -ge 10 ] 2>/dev/null; then
  qemu_bin="$(command -v qemu-system-x86_64)"
elif [ -x "$prefix/usr/bin/qemu-system-x86_64" ]; then
  qemu_bin="$prefix/usr/bin/qemu-system-x86_64"
else
  # bookworm-backports as a deb822 source of its own (priority 100: nothing is upgraded from it).
  if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    if grep -qs 'bookworm' /etc/os-release; then
      echo "adding the bookworm-backports apt source"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        | $sudo tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null
      $sudo apt-get update -q
    else
      echo "error: no QEMU >= 10 on this host and no bookworm-backports to take it from" >&2; exit 2
    fi
  fi
  work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
  # The binary and its data; the libraries it needs beyond bookworm's are fetched the same way.
  pkgs=(qemu-system-x86 qemu-system-common qemu-system-data)
  (cd "$work" && apt-get download -q -t bookworm-backports "${pkgs[@]}")
  mkdir -p "$prefix"
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
  qemu_bin="$prefix/usr/bin/qemu-system-x86_64"
fi
"$qemu_bin" -L "$(dirname "$qemu_bin")/../share/qemu" --version | head -1
mkdir -p "$outdir"
gcc -O2 -Wall -Wextra -shared -fPIC -o "$outdir/vims_syscall.so.tmp" "$src"
mv "$outdir/vims_syscall.so.tmp" "$outdir/vims_syscall.so"
printf '%s\n' "$qemu_bin" > "$outdir/qemu-binary"
echo "plugin: $outdir/vims_syscall.so (QEMU $qemu_bin)"
