"""The motivating case, runnable by the e2e tests and by scripts/demo.sh.

A private PostgreSQL server, the Node.js app in tests/e2e/app (pg-native + the
scenario's own addon vault.node), and the ground truth: bytes the addon leaks
(from the app's own count) and bytes libpq leaks (measured by glibc's mtrace on a
C program doing exactly what vault_keep_results() does once).

    python tests/e2e/scenario.py [--seconds S] [-- natrace run options]

runs `natrace run` on the app and prints natrace's report, then the truth.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE / "app"
BUILD = APP / "build"
sys.path.insert(0, str(HERE.parent))

from pgserver import private_server  # noqa: E402

QUERIES, KEEP_EVERY = 50, 5  # app.js: one keepResults() call keeps 10 PGresults


def node_modules_ready() -> bool:
    return (APP / "node_modules" / "pg-native").is_dir()


@functools.cache
def build_addon() -> Path:
    """vault.node, compiled straight with gcc against /usr/include/node."""
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / "vault.node"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer",
                    "-I/usr/include/node", "-I/usr/include/postgresql", "-o", str(out),
                    str(APP / "vault.c"), "-lpq", "-pthread"], check=True, capture_output=True)
    return out


def libpq_bytes_per_call(conninfo: str) -> tuple[int, int]:
    """(bytes, blocks) one keepResults() call leaks, by glibc's own mtrace."""
    BUILD.mkdir(parents=True, exist_ok=True)
    prog = BUILD / "pgresult_bytes"
    subprocess.run(["gcc", "-O1", "-I/usr/include/postgresql", "-o", str(prog),
                    str(HERE / "pgresult_bytes.c"), "-lpq"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "mtrace"
        env = {**os.environ, "LD_PRELOAD": "libc_malloc_debug.so.0", "MALLOC_TRACE": str(trace)}
        subprocess.run([str(prog), conninfo, str(QUERIES), str(KEEP_EVERY)], check=True,
                       capture_output=True, env=env)
        return unfreed(trace.read_text())


def unfreed(mtrace_log: str) -> tuple[int, int]:
    """Bytes and blocks an mtrace log leaves allocated (+ alloc, - free, < > realloc)."""
    live: dict[str, int] = {}
    for line in mtrace_log.splitlines():
        words = line.split()
        for op in ("+", ">"):
            if op in words:
                i = words.index(op)
                live[words[i + 1]] = int(words[i + 2], 16)
        for op in ("-", "<"):
            if op in words:
                live.pop(words[words.index(op) + 1], None)
    return sum(live.values()), len(live)


@dataclass(frozen=True)
class Truth:
    addon_bytes: int
    addon_blocks: int
    libpq_bytes: int
    kept_results: int


def truth_from(done_line: str, libpq_per_call: tuple[int, int]) -> Truth:
    """The app's `done {...}` line plus the calibration -> the scenario's figures."""
    counts = json.loads(done_line.split(" ", 1)[1])
    calls = counts["kept_results"] // (QUERIES // KEEP_EVERY)
    return Truth(counts["stash_bytes"], counts["stash_blocks"], calls * libpq_per_call[0],
                 counts["kept_results"])


def app_command(conninfo: str, seconds: float, wait: bool = False) -> list[str]:
    cmd = ["node", str(APP / "app.js"), conninfo, "--seconds", str(seconds)]
    return [*cmd, "--wait"] if wait else cmd


def main(argv: list[str]) -> int:
    seconds = 6.0
    if argv[:1] == ["--seconds"]:
        seconds, argv = float(argv[1]), argv[2:]
    natrace_opts = argv[1:] if argv[:1] == ["--"] else argv
    natrace = str(Path(sys.executable).with_name("natrace"))
    env = {**os.environ, "VAULT_ADDON": str(build_addon())}
    with private_server() as pg:
        per_call = libpq_bytes_per_call(pg.conninfo)
        proc = subprocess.run([natrace, "run", *natrace_opts, "--",
                               *app_command(pg.conninfo, seconds)],
                              env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout
    done = next((ln for ln in out.splitlines() if ln.startswith("done ")), None)
    print("\n".join(ln for ln in out.splitlines() if not ln.startswith("done ")))
    if done:
        t = truth_from(done, per_call)
        print(f"Scenario truth: addon:vault leaked {t.addon_bytes:,} B in vault_stash_blocks; "
              f"libpq holds {t.libpq_bytes:,} B in {t.kept_results} PGresults kept by "
              "vault_keep_results; vault_locked_work's mutex is contended.")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
