#!/usr/bin/env bash
# Set up this machine (scripts/provision.sh) and run natrace on the bundled demo.
#
# With Node.js and PostgreSQL present (provision.sh installs both): the motivating
# case, a Node.js app on pg-native with a leaking N-API addon and a contended mutex,
# against a private PostgreSQL server (tests/e2e/scenario.py). The report's Findings
# name libpq's bytes and the API they came through, the addon's leaking function,
# and the contended lock; the scenario's own truth is printed last.
#
# Otherwise: a small C "server" that leaks 1 MiB from cache_response(); the top
# entry names that function with its exact unfreed bytes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/provision.sh"
if command -v node >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
        && [ -d "$here/tests/e2e/app/node_modules/pg-native" ]; then
    exec "$here/.venv/bin/python" "$here/tests/e2e/scenario.py" --seconds 6 -- --top 5
fi
build=$here/demo/build
mkdir -p "$build"
gcc -O1 -g -fno-omit-frame-pointer -o "$build/leaky_server" "$here/demo/leaky_server.c"
exec "$here/.venv/bin/natrace" run --top 5 -- "$build/leaky_server"
