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
    leaker: Path  # leaker.node: leak(n, size) keeps n blocks from leak_blocks()
    signals: Path  # allocates from signal handlers, raised and asynchronous
    dlopened: Path  # dlopen's the sampler (so it interposes nothing), then allocates
    startup_arena: Path  # the sampler compiled in: start-up arena blocks freed, grown


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


@functools.cache
def build() -> Built:
    _run("make", "-s", "-C", ROOT / "sampler")
    BUILD.mkdir(parents=True, exist_ok=True)
    _run("gcc", *CFLAGS, "-pthread", "-o", BUILD / "family", SRC / "family.c")
    _run("g++", *CFLAGS, "-std=c++17", "-o", BUILD / "family_cpp", SRC / "family.cpp")
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-I/usr/include/node", "-o",
         BUILD / "leaker.node", SRC / "leaker.c")
    _run("gcc", *CFLAGS, "-o", BUILD / "signals", SRC / "signals.c")
    _run("gcc", *CFLAGS, "-o", BUILD / "dlopened", SRC / "dlopened.c", "-ldl")
    _run("gcc", *CFLAGS, "-I", ROOT / "sampler", "-o", BUILD / "startup_arena",
         SRC / "startup_arena.c", "-ldl", "-lm", "-lpthread")
    return Built(ROOT / "sampler" / "build" / "libnatrace_sampler.so", BUILD / "family",
                 BUILD / "family_cpp", BUILD / "leaker.node", BUILD / "signals",
                 BUILD / "dlopened", BUILD / "startup_arena")


def semaphores(pid: int, library: Path) -> tuple[int, int]:
    """(alloc, free) semaphore counts of the otel_memory probes in `pid`'s copy of
    `library`, read from its memory at the notes' file offsets."""
    from tracer.probes.usdt import otel_probes

    offsets = {p.name: p.semaphore_offset for p in otel_probes([str(library)])}
    ino = library.stat().st_ino
    counts = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        regions = [line.split() for line in maps]
        for name, off in offsets.items():
            for r in regions:
                start, end = (int(x, 16) for x in r[0].split("-"))
                base = int(r[2], 16)
                if len(r) >= 6 and int(r[4]) == ino and base <= off < base + end - start:
                    mem.seek(start + off - base)
                    counts[name] = int.from_bytes(mem.read(2), "little")
    return counts["alloc"], counts["free"]
