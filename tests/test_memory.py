"""Memory forensics against fixtures with exact ground truth (tests/fixtures/src/memory):
glibc arenas, writable-region counts, smaps speed, reconciliation, and the reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from memfixtures import build

from tracer.engine.session import Session, SessionOptions
from tracer.memory import regions
from tracer.memory.reconcile import split, traced_heap_bytes
from tracer.model.books import AllocatorBooks, ArenaBooks
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.probes.target import attach

NATRACE = str(Path(sys.executable).with_name("natrace"))
MIB = 1 << 20


@contextmanager
def started(*argv: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A fixture that printed its first line; killed afterwards."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[0] in ("ready", "baseline")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def heaps_from_maps(pid: int) -> int:
    """Independent count of glibc heaps: a 64 MiB-aligned anonymous rw-p region followed by
    ---p, the two together exactly 64 MiB."""
    rows = []
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            f = line.split()
            start, end = (int(x, 16) for x in f[0].split("-"))
            rows.append((start, end, f[1], f[4] == "0" and len(f) == 5))
    count = 0
    for (s1, e1, p1, anon1), (s2, e2, p2, anon2) in zip(rows, rows[1:]):
        if (anon1 and anon2 and p1 == "rw-p" and p2 == "---p" and s1 % (64 * MIB) == 0
                and e1 == s2 and e2 - s1 == 64 * MIB):
            count += 1
    return count


@pytest.mark.parametrize(("args", "env", "heaps", "arenas"), [
    ((), {}, 8, 8),                                 # one arena (one heap) per thread
    (("--fill-one",), {}, 9, 8),                    # one arena outgrew its first heap
    ((), {"MALLOC_ARENA_MAX": "2"}, 1, 1),          # main arena + one shared by 8 threads
])
def test_arenas_counted_per_thread(args: tuple[str, ...], env: dict[str, str], heaps: int,
                                   arenas: int) -> None:
    with started(str(build().arenas), *args, env=env) as proc:
        found = regions.read_smaps(proc.pid)
        summary = regions.find_arenas(proc.pid, found)
        assert summary.verified
        assert (len(summary.heaps), summary.arenas) == (heaps, arenas)
        if not args:  # no heap has grown to 64 MiB: the simple shape check applies
            assert heaps_from_maps(proc.pid) == heaps
        assert all(h.start % (64 * MIB) == 0 and h.reserved == 64 * MIB for h in summary.heaps)
        # a thread's stack is named once it blocks in a system call (pause(), right after
        # the barrier that lets main print ready): a loaded machine may run it seconds later
        deadline = time.monotonic() + 60
        while (stacks := sum(1 for r in regions.read_smaps(proc.pid) if r.backing == "stack")
               ) != 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stacks == 9  # main + 8 threads


def test_thousand_writable_mappings_counted_exactly() -> None:
    with started(str(build().mappings)) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        before = regions.summarize(regions.read_smaps(proc.pid))
        proc.stdin.write("x")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "mapped"
        after = regions.summarize(regions.read_smaps(proc.pid))
    assert after.writable - before.writable == 1000
    anon = {b.backing: b.regions for b in after.by_backing}["anonymous"]
    anon_before = {b.backing: b.regions for b in before.by_backing}["anonymous"]
    assert anon - anon_before >= 2000  # 1,000 rw- pages between 1,001 PROT_NONE ones
    assert after.headroom == after.max_map_count - after.regions


def test_smaps_of_sixty_thousand_regions() -> None:
    """Counts stay exact on a process near vm.max_map_count's default (speed is a
    benchmark's business, not a test's: machines are shared and noisy)."""
    with started(str(build().mappings), "30000") as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("x")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "mapped"
        found = regions.read_smaps(proc.pid)
        summary = regions.summarize(found)
        regions.find_arenas(proc.pid, found)
    assert summary.regions > 60_000
    assert summary.writable >= 30_000


def test_parse_smaps_backings() -> None:
    text = b"".join(
        f"{start:x}-{end:x} {perms} 00000000 00:00 {inode}          {path}\n"
        f"Size:               4 kB\nKernelPageSize:        4 kB\nMMUPageSize:           4 kB\n"
        f"Rss:                {rss} kB\nPss:                {rss} kB\n".encode()
        for start, end, perms, inode, path, rss in [
            (0x1000, 0x3000, "rw-p", 0, "[heap]", 8),
            (0x3000, 0x4000, "rw-p", 0, "", 4),
            (0x5000, 0x6000, "r--p", 7, "/usr/lib/libc.so.6", 4),
            (0x7000, 0x8000, "rw-p", 0, "[anon:v8 heap]", 0),
            (0x9000, 0xb000, "rw-p", 0, "", 4),
            (0xc000, 0xd000, "rw-p", 0, "[stack]", 4),
        ])
    found = regions.parse_smaps(text, stack_pointers=[0xa100])
    assert [r.backing for r in found] == ["heap", "anonymous", "file", "anon:v8 heap", "stack",
                                          "stack"]
    assert [r.rss for r in found] == [8192, 4096, 4096, 0, 4096, 4096]
    assert found[2].path == "/usr/lib/libc.so.6"


def _site(kind: str, nbytes: int, symbol: str | None = None, internal: bool = False) -> Site:
    frames = [Frame(0x1000, "/usr/lib/libc.so.6", symbol=symbol, module_class="libc")
              ] if symbol else []
    return Site(kind, frames, nbytes, 1, allocator_internal=internal)


def _books(free_resident: int, overhead: int, large: int) -> AllocatorBooks:
    arena = ArenaBooks(0x1000, True, 1, 100 * MIB, 0, 0, 0, 0, 0, 0, free_resident)
    return AllocatorBooks("glibc", True, arenas=[arena], structs=overhead,
                          mmapped_resident=large)


def test_split_measures_every_part() -> None:
    rss = {"heap": 60 * MIB, "arena": 40 * MIB, "anonymous": 30 * MIB, "file": 10 * MIB,
           "stack": 1 * MIB, "kernel": 4096}
    sp = split(rss, _books(70 * MIB, 1 * MIB, 8 * MIB), 12 * MIB, node=True,
               traced_malloc=20 * MIB, traced_mmap=0)
    parts = {p.key: sp.part(p.key) for p in sp.parts}
    assert parts == {"live": 29 * MIB, "free": 70 * MIB, "overhead": 1 * MIB,
                     "large": 8 * MIB, "v8": 12 * MIB, "stacks": 1 * MIB,
                     "files": 10 * MIB, "other": 10 * MIB + 4096}
    assert sum(p.bytes for p in sp.parts) == sp.rss == 141 * MIB + 4096
    assert sp.free_by_arena == [(0x1000, 70 * MIB)] and not sp.notes
    # no books, no tracing: the heaps stay one part, and the report says why
    blind = split(rss, None, None, node=True)
    assert {p.key: p.bytes for p in blind.parts}["heaps"] == 100 * MIB
    assert sum(p.bytes for p in blind.parts) == blind.rss
    assert any("V8's heap not measured" in n for n in blind.notes)
    assert any("live vs free inside the allocator not measured" in n for n in blind.notes)


def test_traced_heap_bytes_counts_the_allocators_heap_mappings() -> None:
    sites = [_site("malloc", 70 * MIB), _site("mmap", 20 * MIB),
             _site("mmap", 128 * MIB, "alloc_new_heap", internal=True)]
    assert traced_heap_bytes(sites) == 128 * MIB
    assert traced_heap_bytes(sites[:2]) is None


def test_session_keeps_the_last_memory_reading_after_the_target_exits() -> None:
    with started(str(build().arenas)) as proc:
        session = Session(attach(proc.pid), SessionOptions(allocs=False, triage=False,
                                                         memory_interval=0.1))
        session.start()
        session.run(0.5)
        proc.kill()
        proc.wait()
        snap = session.snapshot()
        session.close()
    assert snap.target_exited
    assert snap.memory is not None and snap.memory.last is not None
    assert snap.memory.last.rss > 0 and len(snap.memory.timeline) >= 3
    assert snap.memory.arenas is not None and snap.memory.arenas.arenas == 8
    assert snap.memory.split is not None and snap.memory.verdict is not None
    assert snap.memory.books is not None and snap.memory.books.complete


@pytest.mark.bpf
def test_run_report_confirms_arenas_from_the_allocators_mmaps(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", str(build().arenas)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    mem = json.loads(out.read_text())["memory"]
    arenas = mem["arenas"]
    assert (arenas["arenas"], arenas["heaps"], arenas["verified"]) == (8, 8, True)
    assert arenas["traced_heap_bytes"] == 8 * 64 * MIB  # every heap seen being mapped
    assert arenas["dominates"] == ["VMS"]
    # 8 arenas, yet nothing free in RAM inside them: no advice to pool arenas
    assert mem["verdict"]["kind"] in ("neither", "unknown")
    assert "MALLOC_ARENA_MAX" not in json.dumps(mem["verdict"])
    assert mem["split"]["traced_malloc"] >= 8 * 1000
    assert mem["regions"]["count"] > 0 and mem["timeline"]
    text = subprocess.run([NATRACE, "run", "--", str(build().arenas)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180).stdout
    assert "glibc arenas: 8 in 8 heaps of 64 MiB" in text
    assert "Where RSS goes" in text
