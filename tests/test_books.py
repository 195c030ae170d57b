"""glibc's malloc books read from outside (tracer/memory/books.py) against the target's
own mallinfo2() figures (tests/fixtures/src/memory/frag.c prints them)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from memfixtures import build
from tracing import NATRACE

from tracer.memory import books as booksreader
from tracer.memory import regions
from tracer.memory.reconcile import verdict
from tracer.model.books import AllocatorBooks

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MIB = 1 << 20


class Frag:
    """The running fixture and the mallinfo2 figures it printed last."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.mallinfo = self._books_line()

    def _books_line(self) -> dict[str, int]:
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[0] == "books", words
        return {k: int(v) for k, v in (w.split("=") for w in words[1:])}

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self) -> None:
        self.send("step")
        self.mallinfo = self._books_line()

    def books(self, **kw: object) -> AllocatorBooks:
        found = regions.read_smaps(self.proc.pid)
        arenas = regions.find_arenas(self.proc.pid, found)
        return booksreader.read_books(self.proc.pid, found, arenas.heaps, **kw)  # type: ignore[arg-type]


@contextmanager
def frag(mode: str, threads: int, env: dict[str, str] | None = None,
         drip_ms: int = 0) -> Iterator[Frag]:
    """The fixture, once it has done its setup and printed its mallinfo2 figures."""
    drip = [str(drip_ms)] if drip_ms else []
    proc = subprocess.Popen([str(build().frag), mode, str(threads), *drip], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[0] == "ready"
        yield Frag(proc)
    finally:
        proc.kill()
        proc.wait()


def assert_matches_mallinfo(books: AllocatorBooks, mallinfo: dict[str, int]) -> None:
    assert books.complete, books.reason
    assert books.free == mallinfo["fordblks"]
    assert books.system_mem == mallinfo["arena"]
    assert books.mmapped == mallinfo["hblkhd"]
    assert sum(a.fastbins for a in books.arenas) == mallinfo["fsmblks"]
    assert next(a.top for a in books.arenas if a.main) == mallinfo["keepcost"]
    # the bar; exact above, since the fixture is idle while read
    assert abs(books.free - mallinfo["fordblks"]) <= 0.05 * mallinfo["fordblks"]


@pytest.mark.parametrize("threads", [2, 8])
def test_fragmented_heaps_read_after_the_fact_match_mallinfo2(threads: int) -> None:
    with frag("frag", threads) as f:
        books = f.books()
        assert_matches_mallinfo(books, f.mallinfo)
    assert books.allocator == "glibc"
    assert len(books.arenas) == threads + 1  # one arena per thread, plus main_arena
    assert [a.main for a in books.arenas].count(True) == 1
    # 240 MiB of 1000-byte blocks, 15 of every 16 freed: ~225 MiB free, coalesced into
    # ~15 KB chunks that wait in the unsorted bin; every one of their pages resident
    free = books.free
    assert 220 * MIB < free < 230 * MIB
    assert sum(a.unsorted for a in books.arenas) > 0.99 * (free - sum(a.top for a in books.arenas))
    assert books.free_resident > 0.99 * sum(a.free - a.top for a in books.arenas)
    # each thread's tcache sits at the start of its arena's first heap (main's included)
    assert len(books.tcaches) == threads + 1
    assert {t.arena for t in books.tcaches} == {a.address for a in books.arenas}
    # the three 1 MiB blocks glibc mapped one by one, found in the regions; one touched
    assert books.mmapped_found == books.mmapped == 3 * (MIB + 4096)
    assert MIB <= books.mmapped_resident < 2 * MIB
    assert books.arena_max == 0  # (glibc raised the trim threshold when a big block was freed)


def test_books_follow_a_steady_leak() -> None:
    with frag("leak", 2) as f:
        readings = []
        for _ in range(3):
            f.step()
            books = f.books()
            assert_matches_mallinfo(books, f.mallinfo)
            readings.append(books.in_use)
    # each step keeps 2 x 4 MiB of 1000-byte blocks (1008-byte chunks)
    per_step = 2 * (4 * MIB // 1000) * 1008
    assert [b - a for a, b in zip(readings, readings[1:])] == [per_step, per_step]


def test_arena_max_as_the_process_sees_it() -> None:
    with frag("frag", 2, env={"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "65536"}) as f:
        books = f.books()
        assert_matches_mallinfo(books, f.mallinfo)
    assert (books.arena_max, books.trim_threshold) == (2, 65536)
    assert len(books.arenas) == 2


def test_a_churning_process_is_read_consistently_or_reported_torn() -> None:
    with frag("churn", 2) as f:
        books = f.books()
    assert books.readable
    assert len(books.arenas) + len(books.torn) == 3
    for a in books.arenas:
        assert a.free <= a.system_mem and a.free_resident <= a.free


def test_memory_that_keeps_changing_is_reported_torn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arena read differs from the last: no arena is trusted, all are torn."""
    real = booksreader.Memory.read
    flips = iter(range(1 << 30))

    def changing(self: booksreader.Memory, addr: int, size: int) -> bytes:
        data = real(self, addr, size)
        if size == 2200:  # sizeof(struct malloc_state): a different mutex-free state each time
            return data[:8] + bytes([next(flips) & 0xFF]) + data[9:]
        return data

    monkeypatch.setattr(booksreader.Memory, "read", changing)
    monkeypatch.setattr(booksreader, "BUSY_WAIT", 0.0)
    with frag("frag", 2) as f:
        books = f.books()
    assert books.readable and books.arenas == [] and len(books.torn) == 3
    assert not books.complete


def test_missing_debug_info_is_one_clear_line(tmp_path: Path) -> None:
    with frag("idle", 1) as f:
        books = f.books(debug_dirs=[str(tmp_path)], cache_dir="")
    assert not books.readable
    assert books.reason is not None and "\n" not in books.reason
    assert "install libc6-dbg" in books.reason and str(tmp_path) in books.reason


def test_layout_is_cached_by_build_id(tmp_path: Path) -> None:
    with frag("idle", 1) as f:
        first = f.books(cache_dir=str(tmp_path))
        cached = list(tmp_path.iterdir())
        assert len(cached) == 1 and cached[0].suffix == ".json"
        # a cached layout is used without the debug files
        again = f.books(cache_dir=str(tmp_path), debug_dirs=["/nonexistent"])
    assert first.complete and again.complete
    assert again.free == first.free and again.system_mem == first.system_mem


@pytest.mark.bpf
def test_a_process_that_never_called_malloc_has_complete_empty_books() -> None:
    """`true` never calls malloc: its main arena is all zeroes (top 0 until malloc's first
    call), which read as torn after 20 retries a reading (~0.2 s of `run -- true`)."""
    out = subprocess.run([NATRACE, "run", "--json", "--", "true"], capture_output=True,
                         text=True, timeout=300, check=True)
    books = json.loads(out.stdout)["memory"]["books"]
    assert (books["complete"], books["torn"], books["in_use"], books["free"]) == (True, [], 0, 0)
    assert [(a["main"], a["system_mem"], a["top"]) for a in books["arenas"]] == [(True, 0, 0)]


def test_jemalloc_preloaded_says_what_cannot_be_read() -> None:
    with frag("frag", 2, env={"LD_PRELOAD": JEMALLOC}) as f:
        books = f.books()
        assert f.mallinfo["arena"] == 0  # glibc's books are empty: jemalloc serves malloc
    assert (books.allocator, books.readable) == ("jemalloc", False)
    assert books.reason is not None and "jemalloc" in books.reason and "\n" not in books.reason


def test_more_free_chunks_than_a_walk_follows_is_said_not_retried(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(booksreader, "MAX_CHUNKS", 100)
    with frag("frag", 2) as f:
        books = f.books()
    assert books.readable and not books.complete and not books.torn
    assert len(books.unwalked) == 2 and [a.main for a in books.arenas] == [True]
    v = verdict(books, [], 300 * MIB)
    assert v.kind == "unknown" and "more free chunks than natrace walks" in v.evidence[0]
