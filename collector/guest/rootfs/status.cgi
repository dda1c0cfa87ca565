#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "host: $(hostname)"
echo "uptime: $(cut -d' ' -f1 /proc/uptime)"
echo "query: $QUERY_STRING"
echo "processes: $(ls -d /proc/[0-9]* | wc -l)"
