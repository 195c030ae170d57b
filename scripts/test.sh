#!/usr/bin/env bash
# Set up this machine (scripts/provision.sh) and run every check natrace has:
# ruff, mypy, and the whole pytest suite (real eBPF: needs root). Extra
# arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$here/scripts/provision.sh"
cd "$here"
.venv/bin/ruff check tracer tests bench
.venv/bin/mypy tracer
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
