#!/bin/sh
# A client of a service on the host, reached through ttyS2, which QEMU connects to a loopback TCP port
# (the gate that REM-S controls). Each request is a line "HELLO <seq> <host> <uptime>"; the service
# answers one line. When the line is down (nothing listening, or REM-S cut it) there is no answer:
# the client notes it and tries again, so it picks up by itself when the line comes back.
port=/dev/ttyS2
stty -F $port raw -echo -icrnl -onlcr 2>/dev/null
exec 3<>$port
seq=0
while true; do
    seq=$((seq + 1))
    echo "HELLO $seq $(hostname) $(cut -d' ' -f1 /proc/uptime)" >&3
    if read -t 5 -r reply <&3; then
        state="up $seq $reply"
    else
        state="down $seq"
    fi
    echo "$(date +%s) $state" > /var/run/vims-client.state
    echo "$(date +%s) $state" >> /var/log/vims-client.log
    if [ "$(wc -c < /var/log/vims-client.log)" -gt 32768 ]; then
        tail -n 50 /var/log/vims-client.log > /var/log/vims-client.log.1
        mv /var/log/vims-client.log.1 /var/log/vims-client.log
    fi
    sleep 2
done
