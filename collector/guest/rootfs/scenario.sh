#!/bin/sh
# Scenarios the host triggers through the control channel: vims-scenario normal|webshell|adduser|tamper-binary
. /etc/vims/tamper.conf
case "$1" in
normal)
    wget -q -O /dev/null http://127.0.0.1/index.html || { echo "normal: web server down"; exit 1; }
    wget -q -O - "http://127.0.0.1/cgi-bin/status.cgi?from=scenario" > /tmp/normal.out
    ls /www > /dev/null
    echo "normal: ok ($(wc -l < /tmp/normal.out) lines from status.cgi)"
    ;;
webshell)
    # The web server is made to run a shell through a CGI script that executes its query string:
    # it reads /etc/shadow, drops a file and starts a network listener (busybox nc).
    cmd='cat /etc/shadow; echo owned > /www/owned.txt; (timeout 120 nc -l -p 4444 </dev/null >/dev/null 2>&1 &); echo started nc'
    enc=$(echo "$cmd" | sed -e 's/%/%25/g' -e 's/ /%20/g' -e 's/;/%3B/g' -e 's/&/%26/g' \
        -e 's/>/%3E/g' -e 's/</%3C/g' -e 's/(/%28/g' -e 's/)/%29/g' -e 's/\//%2F/g')
    wget -q -O /tmp/webshell.out "http://127.0.0.1/cgi-bin/exec.cgi?cmd=$enc" \
        || { echo "webshell: request failed"; exit 1; }
    sleep 1
    echo "webshell: read $(grep -c : /tmp/webshell.out) shadow lines, wrote /www/owned.txt," \
        "nc pid $(pidof nc || echo none)"
    ;;
adduser)
    grep -q '^toor:' /etc/passwd || echo 'toor:x:0:0:toor:/root:/bin/sh' >> /etc/passwd
    grep -q '^toor:' /etc/shadow || echo 'toor::19000:0:99999:7:::' >> /etc/shadow
    grep -q '^eve:' /etc/passwd || echo 'eve:x:1001:1001:eve:/home/eve:/bin/sh' >> /etc/passwd
    echo "adduser: /etc/passwd has $(wc -l < /etc/passwd) users, uid 0: $(grep -c ':x:0:' /etc/passwd)"
    ;;
tamper-binary)
    # Replace the program with a copy that differs in one byte of a code page that runs (padding after
    # its entry point), then start it: harmless, but its mapped code no longer matches the original.
    killall busybox-ticker 2>/dev/null
    cp "$TAMPER_PROGRAM" /tmp/tampered
    printf "\\$(printf %o "$TAMPER_VALUE")" | dd of=/tmp/tampered bs=1 seek="$TAMPER_OFFSET" conv=notrunc 2>/dev/null
    chmod 755 /tmp/tampered
    mv /tmp/tampered "$TAMPER_PROGRAM"
    ( "$TAMPER_PROGRAM" sleep 3600 </dev/null >/dev/null 2>&1 & )
    sleep 1
    echo "tamper-binary: replaced $TAMPER_PROGRAM (offset $TAMPER_OFFSET), running as pid" \
        "$(pidof busybox-ticker || echo none)"
    ;;
reset)
    # Undo the other scenarios, so that tests sharing one guest can leave it clean.
    killall busybox-ticker nc 2>/dev/null
    cp /bin/busybox /tmp/ticker && chmod 755 /tmp/ticker && mv /tmp/ticker "$TAMPER_PROGRAM"
    sed -i -e '/^toor:/d' -e '/^eve:/d' /etc/passwd /etc/shadow
    rm -f /www/owned.txt /tmp/webshell.out
    echo "reset: ok"
    ;;
*)
    echo "unknown scenario: $1 (normal, webshell, adduser, tamper-binary)"
    exit 2
    ;;
esac
