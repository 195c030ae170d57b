"""The in-process sampler (sampler/, built by make as scripts/provision.sh does) and the
fixtures that exercise every entry point it interposes (tests/fixtures/src/sampler)."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(__file__).parent / "fixtures" / "src" / "sampler"
BUILD = Path(__file__).parent / "fixtures" / "build" / "sampler"
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer"]
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@dataclass(frozen=True)
class Built:
    library: Path  # libnatrace_sampler.so
    family: Path  # every C entry point; prints its live/freed blocks
    family_cpp: Path  # every operator new/delete variant


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


@functools.cache
def build() -> Built:
    _run("make", "-s", "-C", ROOT / "sampler")
    BUILD.mkdir(parents=True, exist_ok=True)
    _run("gcc", *CFLAGS, "-pthread", "-o", BUILD / "family", SRC / "family.c")
    _run("g++", *CFLAGS, "-std=c++17", "-o", BUILD / "family_cpp", SRC / "family.cpp")
    return Built(ROOT / "sampler" / "build" / "libnatrace_sampler.so", BUILD / "family",
                 BUILD / "family_cpp")


def truth(output: str) -> tuple[list[int], list[int]]:
    """A fixture's printed ground truth: sizes of the blocks it keeps and frees."""
    live = [int(line.split()[1]) for line in output.splitlines() if line.startswith("live ")]
    freed = [int(line.split()[1]) for line in output.splitlines() if line.startswith("freed ")]
    return live, freed
