"""Builds the handle-lifecycle fixtures from tests/fixtures/src/handles (once per run).

Each fixture's source states its ground truth; tests/test_handles.py asserts it.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).parent / "fixtures" / "src" / "handles"
BUILD = Path(__file__).parent / "fixtures" / "build" / "handles"
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer"]


@dataclass(frozen=True)
class Built:
    pgresults: Path  # linked with -lpq
    pglate: Path  # dlopen()s libpq after the start
    widgets: Path  # linked with libwidget.so
    libwidget: Path
    refs_node: Path  # Node-API addon
    refs_js: Path  # node refs.js refs.node


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def _pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", *args, "libpq"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/postgresql"] if "--cflags" in args else ["-lpq"]
    return out.split()


@functools.cache
def build() -> Built:
    BUILD.mkdir(parents=True, exist_ok=True)
    b = BUILD
    _run("gcc", *CFLAGS, *_pkg_config("--cflags"), "-o", b / "pgresults", SRC / "pgresults.c",
         *_pkg_config("--libs"))
    _run("gcc", *CFLAGS, "-o", b / "pglate", SRC / "pglate.c", "-ldl")
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", b / "libwidget.so", SRC / "libwidget.c")
    _run("gcc", *CFLAGS, "-o", b / "widgets", SRC / "widgets.c", f"-L{b}", "-lwidget",
         f"-Wl,-rpath,{b}")
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-I/usr/include/node", "-o", b / "refs.node",
         SRC / "refs.c")
    return Built(b / "pgresults", b / "pglate", b / "widgets", b / "libwidget.so", b / "refs.node",
                 SRC / "refs.js")
