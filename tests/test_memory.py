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
from tracer.memory.reconcile import reconcile, traced_heap_bytes
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
        for _ in range(50):  # a thread's stack is named once it blocks in a system call
            stacks = sum(1 for r in regions.read_smaps(proc.pid) if r.backing == "stack")
            if stacks == 9:
                break
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


def test_reconcile_splits_the_remainder_by_owner() -> None:
    rss = {"heap": 60 * MIB, "arena": 40 * MIB, "anonymous": 30 * MIB, "file": 10 * MIB,
           "stack": 1 * MIB}
    sites = [_site("malloc", 70 * MIB), _site("mmap", 20 * MIB),
             _site("stack", 8 * MIB, "pthread_create@GLIBC_2.2.5", internal=True),
             _site("mmap", 128 * MIB, "alloc_new_heap", internal=True)]
    rec = reconcile(rss, sites, traced=True, from_start=True, node=False)
    owners = {s.owner.split(" (")[0]: s.bytes for s in rec.remainder}
    assert (rec.rss, rec.malloc_bytes, rec.mmap_bytes) == (141 * MIB, 70 * MIB, 20 * MIB)
    assert owners == {"allocator-retained or fragmented": 30 * MIB, "file mappings": 10 * MIB,
                      "thread stacks": 1 * MIB, "anonymous mappings not traced": 10 * MIB}
    assert rec.explained + sum(owners.values()) == rec.rss
    assert traced_heap_bytes(sites) == 128 * MIB
    untraced = reconcile(rss, [], traced=False, from_start=False, node=True)
    assert untraced.explained == 0
    assert any(s.owner.startswith("V8 heap") and s.bytes == 30 * MIB for s in untraced.remainder)


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
    assert snap.memory.reconciliation is not None


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
    assert "MALLOC_ARENA_MAX" in arenas["advice"]
    rec = mem["reconciliation"]
    assert rec["traced"] and rec["malloc_bytes"] >= 8 * 1000
    assert mem["regions"]["count"] > 0 and mem["timeline"]
    text = subprocess.run([NATRACE, "run", "--", str(build().arenas)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180).stdout
    assert "glibc arenas: 8 in 8 heaps of 64 MiB" in text
    assert "Where RSS goes" in text
