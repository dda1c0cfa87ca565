#!/bin/sh
# The control channel (ttyS1, a loopback TCP port on the host). A request is one line
#   VIMS <id> <timeout-seconds> <base64 of a shell script>
# and the answer is
#   @@BEGIN <id>
#   <base64 of the script's stdout+stderr>
#   @@END <id> <exit status>
# Anything else on the line is ignored, so a host that connects mid-line or early loses nothing.
port=/dev/ttyS1
stty -F $port raw -echo -icrnl -onlcr 2>/dev/null
exec 3<>$port
mkdir -p /tmp/vims-agent
dog=/tmp/vims-agent/watchdog
[ -p $dog ] || mkfifo $dog
while read -r tag id limit script <&3; do
    [ "$tag" = VIMS ] || continue
    case "$id$limit" in *[!0-9a-zA-Z]*) continue ;; esac
    work=/tmp/vims-agent/$id
    echo "$script" | base64 -d > $work.sh 2>/dev/null
    sh $work.sh > $work.out 2>&1 < /dev/null &
    pid=$!
    # A watchdog that is a shell builtin (read -t on a FIFO nobody writes to): killing it leaves no
    # sleeping helper behind, unlike busybox timeout, whose watcher lingers for the whole limit.
    ( read -t "$limit" _ <> $dog; kill -9 $pid 2>/dev/null ) &
    watchdog=$!
    wait $pid
    rc=$?
    kill $watchdog 2>/dev/null
    { echo "@@BEGIN $id"; base64 $work.out; echo "@@END $id $rc"; } >&3
    rm -f $work.sh $work.out
done
