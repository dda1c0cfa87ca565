#!/bin/sh
# Users of the web server: a static page and a CGI request every few seconds, over loopback.
while true; do
    wget -q -O /dev/null http://127.0.0.1/index.html
    wget -q -O /var/run/status.txt "http://127.0.0.1/cgi-bin/status.cgi?from=webclient"
    sleep 3
done
