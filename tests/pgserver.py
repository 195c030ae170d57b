"""A private PostgreSQL server for tests: initdb into a temporary directory, unix
socket only, trust auth, fsync off; stopped afterwards whatever happens.

Runs as the `postgres` user (initdb refuses root). Connect with
`host=<socket dir> port=<port> user=postgres dbname=postgres`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class PgServer:
    socket_dir: str
    port: int

    @property
    def conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"


def _bindir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server not installed: run scripts/provision.sh")
    return os.path.dirname(found[-1])


def _as_postgres(*cmd: str) -> None:
    # No pipes: the server pg_ctl starts would hold them open.
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


@contextmanager
def private_server(port: int = 54329) -> Iterator[PgServer]:
    bindir = _bindir()
    top = tempfile.mkdtemp(prefix="natrace-pg-")
    shutil.chown(top, "postgres", "postgres")
    os.chmod(top, 0o755)  # the socket must be reachable by other users (the test's clients)
    data = os.path.join(top, "data")
    try:
        _as_postgres(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres",
                     "--no-sync")
        opts = f"-c listen_addresses='' -k {top} -p {port} -c fsync=off"
        _as_postgres(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(top, "log"), "-w",
                     "-o", opts, "start")
        yield PgServer(top, port)
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            _as_postgres(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(top, ignore_errors=True)
