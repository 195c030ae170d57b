"""The session's eye on the target's memory: a timeline sample every interval, the
regions, arenas and the allocator's books as often as their cost allows, and the last of
each kept once the target exits, so a report still says where memory stood.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from tracer.memory import books as booksreader
from tracer.memory import regions as regionscan
from tracer.memory.memstat import MemoryTimeline, thread_count
from tracer.memory.reconcile import split, traced_heap_bytes, verdict
from tracer.model.books import AllocatorBooks, BooksReading
from tracer.model.memory import (
    ArenaSummary,
    MemoryReport,
    MemorySample,
    Region,
    RegionSummary,
)
from tracer.model.sites import Site

# Reading smaps walks every page table: with tens of thousands of regions it takes
# ~0.5 s, so regions are re-read at most once per this many times their last cost.
REGIONS_COST_FACTOR = 20
BOOKS_COST_FACTOR = 4  # the books are read at most once per this many times their cost
# Production mode (a process sampling itself, traced for hours): regions and books at
# most 1% of a CPU each.
PRODUCTION_COST_FACTOR = 100
MAX_READINGS = 512  # books readings kept for the leak verdict (then every other one)


class MemoryWatch:
    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.timeline = MemoryTimeline(pid)
        self.regions: RegionSummary | None = None
        self.arenas: ArenaSummary | None = None
        self.rss_by_backing: dict[str, int] = {}
        self.node = False  # a Node.js process: its untraced anonymous memory is V8's
        self.books: AllocatorBooks | None = None
        self.readings: list[BooksReading] = []
        self._next_sample = 0.0
        self._next_regions = 0.0
        self._next_books = 0.0
        self._regions_factor = REGIONS_COST_FACTOR
        self._books_factor = BOOKS_COST_FACTOR

    def production(self) -> None:
        """Read regions and books at a small share of a CPU (production mode)."""
        self._regions_factor = self._books_factor = PRODUCTION_COST_FACTOR

    def tick(self) -> MemorySample | None:
        """Sample if an interval has passed; re-read regions if their cost allows."""
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + self.interval
            self.timeline.sample()
            if now >= self._next_regions:
                self.refresh_regions()
        return self.timeline.last

    def refresh_regions(self, books: bool = False) -> bool:
        """Read smaps and find arenas now (and the allocator's books when `books` or
        their cost allows); False (and the last reading kept) if the process has gone."""
        began = time.monotonic()
        try:
            found = regionscan.read_smaps(self.pid)
        except OSError:
            return False
        if not found:  # a zombie's smaps is empty
            return False
        arenas = regionscan.find_arenas(self.pid, found)
        arenas.threads = thread_count(self.pid)
        self.arenas = arenas
        self.regions = regionscan.summarize(found)
        self.rss_by_backing = regionscan.rss_by_backing(found)
        self.node = any(os.path.basename(r.path).startswith(("node", "libnode"))
                        for r in found if r.backing == "file")
        cost = time.monotonic() - began
        self._next_regions = time.monotonic() + max(self.interval, self._regions_factor * cost)
        if books or time.monotonic() >= self._next_books:
            self._read_books(found, arenas)
        return True

    def _read_books(self, found: list[Region], arenas: ArenaSummary) -> None:
        began = time.monotonic()
        read = booksreader.read_books(self.pid, found, arenas.heaps, arenas.threads)
        self.books = read
        if read.complete:
            self.readings.append(BooksReading(read.at, read.in_use, read.free,
                                              read.free_resident))
            if len(self.readings) > MAX_READINGS:
                self.readings = self.readings[::2]
        cost = time.monotonic() - began
        self._next_books = time.monotonic() + max(self.interval, self._books_factor * cost)

    def report(self, sites: Sequence[Site], traced: bool, from_start: bool,
               v8_ranges: Sequence[tuple[int, int]] | None = None,
               command: str | None = None) -> MemoryReport:
        """Everything known now (fresh readings when the process is still there).
        `v8_ranges`: live mappings node's own code made (traced), for V8's share."""
        self.timeline.sample()
        self.refresh_regions(books=True)
        arenas = self.arenas
        last = self.timeline.last
        if arenas is not None:
            arenas.traced_heap_bytes = traced_heap_bytes(sites) if traced else None
            if last is not None:
                arenas.dominates = regionscan.dominance(arenas, last.vms, last.rss)
        rss_split = verdict_now = None
        if self.rss_by_backing:
            user = [s for s in sites if not s.allocator_internal]
            v8 = None if v8_ranges is None else booksreader.resident_bytes(self.pid, v8_ranges)
            rss_split = split(self.rss_by_backing, self.books, v8, self.node,
                              sum(s.bytes for s in user if s.kind == "malloc") if traced
                              else None,
                              sum(s.bytes for s in user if s.kind != "malloc") if traced
                              else None, from_start)
            verdict_now = verdict(self.books, self.readings, rss_split.rss, command)
        return MemoryReport(timeline=list(self.timeline.samples), regions=self.regions,
                            arenas=arenas, books=self.books,
                            books_timeline=list(self.readings), split=rss_split,
                            verdict=verdict_now)
