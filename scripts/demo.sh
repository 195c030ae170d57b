#!/usr/bin/env bash
# Set up this machine (scripts/provision.sh) and run natrace on the bundled demo:
# a small C "server" that leaks 1 MiB from cache_response(). The report's top
# entry names that function with its exact unfreed bytes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/provision.sh"
build=$here/demo/build
mkdir -p "$build"
gcc -O1 -g -fno-omit-frame-pointer -o "$build/leaky_server" "$here/demo/leaky_server.c"
exec "$here/.venv/bin/natrace" run --top 5 -- "$build/leaky_server"
