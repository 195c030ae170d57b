"""Builds the memory-forensics fixtures from tests/fixtures/src/memory (once per run).

Each source states its ground truth; tests/test_memory.py and tests/test_guard.py
assert it exactly.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).parent / "fixtures" / "src" / "memory"
BUILD = Path(__file__).parent / "fixtures" / "build" / "memory"
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-pthread"]


@dataclass(frozen=True)
class Built:
    arenas: Path
    mappings: Path
    grower: Path
    frag: Path


@functools.cache
def build() -> Built:
    BUILD.mkdir(parents=True, exist_ok=True)
    for name in ("arenas", "mappings", "grower", "frag"):
        subprocess.run(["gcc", *CFLAGS, "-o", str(BUILD / name), str(SRC / f"{name}.c")],
                       check=True, capture_output=True)
    return Built(BUILD / "arenas", BUILD / "mappings", BUILD / "grower", BUILD / "frag")
