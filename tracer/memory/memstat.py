"""RSS, VMS, USS/PSS and swap of the traced process over time (psutil).

The session samples at an interval; the timeline keeps its last sample once the
target exits, so a report written afterwards still shows where memory stood.
"""

from __future__ import annotations

import time

import psutil

from tracer.model.memory import MemorySample

MAX_SAMPLES = 2048  # past this the timeline keeps every other sample (half resolution)


def read_sample(pid: int) -> MemorySample | None:
    """The process's memory counters now, or None when it has gone."""
    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()  # smaps_rollup: USS, PSS, swap
            return MemorySample(time.time(), full.rss, full.vms, full.uss,
                                getattr(full, "pss", None), getattr(full, "swap", None))
        except psutil.AccessDenied:
            basic = proc.memory_info()
            return MemorySample(time.time(), basic.rss, basic.vms)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, OSError):
        return None


def thread_count(pid: int) -> int | None:
    try:
        return psutil.Process(pid).num_threads()
    except (psutil.Error, OSError):
        return None


class MemoryTimeline:
    """Samples of one process, oldest first, bounded in length."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[MemorySample] = []

    def sample(self) -> MemorySample | None:
        """Take a sample; None (and the timeline unchanged) once the process is gone."""
        s = read_sample(self.pid)
        if s is None:
            return None
        self.samples.append(s)
        if len(self.samples) > MAX_SAMPLES:
            self.samples = self.samples[::2] + ([s] if len(self.samples) % 2 == 0 else [])
        return s

    @property
    def last(self) -> MemorySample | None:
        return self.samples[-1] if self.samples else None

    def growth(self, seconds: float) -> int | None:
        """RSS gained over the last `seconds` (None until the timeline spans that long)."""
        last = self.last
        if last is None:
            return None
        for s in reversed(self.samples):
            if last.at - s.at >= seconds - 1e-3:
                return last.rss - s.rss
        return None
