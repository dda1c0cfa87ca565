#!/usr/bin/env bash
# Starts libvirt's daemon on this host for the tests of `vims attach libvirt:DOMAIN`, if it is not running:
# libvirtd from Debian's packages (scripts/system-packages.sh installs them), with the QEMU driver.
# On a host without systemd (a CI container), Debian's postinst steps that libvirt needs are done
# here: the libvirt-qemu user, the run and log folders, and, only where the host has no qemu.conf of its
# own, one that runs QEMU as root without cgroups or a security driver (a container has neither).
# An operator's host runs libvirtd as its distribution set it up; VIMS needs nothing more there.
set -euo pipefail
LOGSOCK=/run/libvirt/virtlogd-sock
# A socket file proves nothing (a daemon that died, or a host that was stopped, leaves it behind):
# something must answer on it (systemd's socket activation answers too).
answers() { python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null; }
if virsh -q -c qemu:///system uri >/dev/null 2>&1 && answers "$LOGSOCK"; then exit 0; fi
if [ "$(id -u)" -ne 0 ]; then echo "error: libvirtd is not running and starting it needs root" >&2; exit 2; fi
command -v libvirtd >/dev/null || { echo "error: libvirtd not found (scripts/system-packages.sh installs it)" >&2; exit 2; }
getent group kvm >/dev/null || groupadd --system kvm
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin \
  --gid libvirt-qemu libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /etc/libvirt
if [ ! -e /etc/libvirt/qemu.conf ]; then
  cat > /etc/libvirt/qemu.conf <<'CONF'
# Written by VIMS's scripts/libvirt-up.sh for a host without systemd: QEMU as root, no cgroups.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
CONF
fi
# QEMU's output goes through libvirt's log daemon.
if ! answers "$LOGSOCK"; then
  rm -f "$LOGSOCK" /run/libvirt/virtlogd-admin-sock  # left by a virtlogd that is gone
  virtlogd --daemon --pid-file /var/run/libvirt/vims-virtlogd.pid
fi
pgrep -x libvirtd >/dev/null || libvirtd --daemon --pid-file /var/run/libvirt/vims-libvirtd.pid
for _ in $(seq 50); do
  if virsh -q -c qemu:///system uri >/dev/null 2>&1 && answers "$LOGSOCK"; then exit 0; fi
  sleep 0.2
done
echo "error: libvirtd or virtlogd did not answer (on $LOGSOCK); see /var/log/libvirt/libvirtd.log" >&2
tail -5 /var/log/libvirt/libvirtd.log >&2 || true
exit 1
