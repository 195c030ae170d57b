"""The benchmark workloads: C and JS sources here, built into bench/build/.

Each follows the protocol in gate.h (ready / hot_ns= calls= / idle, gated by bytes
on stdin) so that every tool's start-up stays outside the timed phase.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).parent
BUILD = SRC.parent / "build"
CFLAGS = ["-O2", "-g", "-fno-omit-frame-pointer"]
LEAK_FUNCTION = "leak_here"
LEAK_BLOCK = 1000


@dataclass(frozen=True)
class Leak:
    """Ground truth: what the workload leaves allocated, and from which function."""

    function: str
    blocks: int
    bytes: int


@dataclass(frozen=True)
class Workload:
    name: str
    argv: tuple[str, ...]
    op: str  # what one of the `calls` it reports is
    leak: Leak | None = None
    valgrind: bool = False  # memcheck runs only where it finishes in reasonable time


def _run(*cmd: str | Path) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"build failed: {' '.join(map(str, cmd))}\n{proc.stderr}")


@functools.cache
def build() -> Path:
    """Compile every workload (always from source: never a stale binary)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    for name in ("malloc_heavy", "futex_heavy", "mmap_heavy", "alloc_fastpath",
                 "syscall_loop", "malloc_batches"):
        _run("gcc", *CFLAGS, "-pthread", "-o", BUILD / name, SRC / f"{name}.c")
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-I/usr/include/node", "-o",
         BUILD / "addon.node", SRC / "addon.c")
    _run("gcc", *CFLAGS, "-o", BUILD / "sqlite_mix", SRC / "sqlite_mix.c", "-lsqlite3")
    _run("gcc", *CFLAGS, "-o", BUILD / "deep_stack_fp", SRC / "deep_stack.c")
    _run("gcc", "-O2", "-g", "-fomit-frame-pointer", "-o", BUILD / "deep_stack_nofp",
         SRC / "deep_stack.c")
    return BUILD


def workloads(quick: bool, scale: int = 1) -> dict[str, Workload]:
    """Every workload by name, sized for a full run or a --quick smoke run; `scale`
    multiplies each hot phase's work (the leak stays the same)."""
    b = str(BUILD)
    pairs, leaks = (100_000, 1_000) if quick else (2_000_000, 10_000)
    pairs *= scale
    futex_iters = (50_000 if quick else 1_000_000) * scale
    mmap_iters = (5_000 if quick else 50_000) * scale
    node_iters = (10_000 if quick else 200_000) * scale
    sqlite_iters = (300 if quick else 3_000) * scale

    def malloc(threads: int) -> Workload:
        suffix = "" if threads == 1 else f"-{threads}t"
        return Workload(f"malloc{suffix}",
                        (f"{b}/malloc_heavy", str(pairs), str(leaks), str(threads)),
                        "malloc or free", Leak(LEAK_FUNCTION, leaks, leaks * LEAK_BLOCK),
                        valgrind=True)

    found = [
        malloc(1),
        malloc(2),
        Workload("futex", (f"{b}/futex_heavy", str(futex_iters), "4"), "mutex lock"),
        Workload("mmap", (f"{b}/mmap_heavy", str(mmap_iters)), "mmap/mprotect/munmap"),
        Workload("node", ("/usr/bin/node", str(SRC / "node_buffers.js"), f"{b}/addon.node",
                          str(node_iters)), "Buffer or addon call"),
        Workload("sqlite", (f"{b}/sqlite_mix", str(sqlite_iters)), "SQL statement"),
    ]
    deep_pairs = (20_000 if quick else 200_000) * scale
    found += [Workload(f"deep-{fp}-{depth}", (f"{b}/deep_stack_{fp}", str(depth),
                                               str(deep_pairs)), "malloc or free")
              for fp in ("fp", "nofp") for depth in (4, 32, 100)]
    return {w.name: w for w in found}


def mmap_paced(iters: int, rate: float) -> Workload:
    """mmap/munmap only, paced to `rate` streamed events per second (0: as fast as it
    can): the event-pipeline throughput driver. Its calls are its streamed events."""
    name = f"mmap@{rate:g}/s" if rate else "mmap@max"
    return Workload(name, (f"{BUILD}/mmap_heavy", str(iters), str(rate)), "mmap or munmap")
