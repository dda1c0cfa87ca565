#!/bin/sh
# A periodic job (what cron would run): record the load, rotate a log, count the web server's pages.
mkdir -p /var/log
n=0
while true; do
    n=$((n + 1))
    busybox-ticker uptime > /var/run/uptime
    echo "$(date +%s) tick $n $(cat /proc/loadavg)" >> /var/log/periodic.log
    if [ "$(wc -c < /var/log/periodic.log)" -gt 65536 ]; then
        tail -n 100 /var/log/periodic.log > /var/log/periodic.log.1
        mv /var/log/periodic.log.1 /var/log/periodic.log
    fi
    ls /www > /var/run/pages
    sleep 5
done
