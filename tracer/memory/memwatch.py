"""The session's eye on the target's memory: a timeline sample every interval, the
regions and arenas as often as their cost allows, and the last of each kept once the
target exits, so a report still says where memory stood.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from tracer.memory import regions as regionscan
from tracer.memory.memstat import MemoryTimeline, thread_count
from tracer.memory.reconcile import reconcile, traced_heap_bytes
from tracer.model.memory import ArenaSummary, MemoryReport, MemorySample, RegionSummary
from tracer.model.sites import Site

# Reading smaps walks every page table: with tens of thousands of regions it takes
# ~0.5 s, so regions are re-read at most once per this many times their last cost.
REGIONS_COST_FACTOR = 20


class MemoryWatch:
    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self.pid = pid
        self.interval = interval
        self.timeline = MemoryTimeline(pid)
        self.regions: RegionSummary | None = None
        self.arenas: ArenaSummary | None = None
        self.rss_by_backing: dict[str, int] = {}
        self.node = False  # a Node.js process: its untraced anonymous memory is V8's
        self._next_sample = 0.0
        self._next_regions = 0.0

    def tick(self) -> MemorySample | None:
        """Sample if an interval has passed; re-read regions if their cost allows."""
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + self.interval
            self.timeline.sample()
            if now >= self._next_regions:
                self.refresh_regions()
        return self.timeline.last

    def refresh_regions(self) -> bool:
        """Read smaps and find arenas now; False (and the last reading kept) if the
        process has gone."""
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
        self._next_regions = time.monotonic() + max(self.interval, REGIONS_COST_FACTOR * cost)
        return True

    def report(self, sites: Sequence[Site], traced: bool, from_start: bool) -> MemoryReport:
        """Everything known now (fresh readings when the process is still there)."""
        self.timeline.sample()
        self.refresh_regions()
        arenas = self.arenas
        last = self.timeline.last
        if arenas is not None:
            arenas.traced_heap_bytes = traced_heap_bytes(sites) if traced else None
            if last is not None:
                arenas.dominates = regionscan.dominance(arenas, last.vms, last.rss)
        rec = None
        if self.rss_by_backing:
            rec = reconcile(self.rss_by_backing, sites, traced, from_start, self.node)
        return MemoryReport(timeline=list(self.timeline.samples), regions=self.regions,
                            arenas=arenas, reconciliation=rec)

