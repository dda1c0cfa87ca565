#!/bin/sh
# First thing busybox init runs: file systems, loopback, and (first boot only) the kallsyms capture.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /var/log /var/run /var/spool
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=16m tmpfs /tmp
hostname vims-guest
ifconfig lo 127.0.0.1 netmask 255.0.0.0 up
echo 0 > /proc/sys/kernel/kptr_restrict
echo 0 > /proc/sys/kernel/printk_ratelimit
if grep -q 'vims.capture=1' /proc/cmdline; then
    # The host reads the kernel's symbols from this port once, at the first boot of a kernel.
    stty -F /dev/ttyS3 raw -echo 2>/dev/null
    { cat /proc/kallsyms; echo '@@KALLSYMS-END'; } > /dev/ttyS3
fi
echo "@@VIMS-BOOTED $(cat /proc/uptime)" > /dev/console
