"""Event-pipeline throughput: how fast natrace's consumer drains streamed events.

mmap/munmap are streamed through the ring buffer of bpf/alloc.bpf.c (one event per
call); a full buffer drops the event and counts it in `events_lost`. The driver
(mmap_heavy with a RATE) is paced up a ladder of rates, then run unpaced; each
step reports the rate reached and the events natrace says it lost.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError
from bench.tools import Natrace
from bench.workloads import mmap_paced


@dataclass(frozen=True)
class Step:
    target_rate: float  # events/s asked for; 0 = unpaced
    events: int
    seconds: float
    events_lost: int | None
    natrace_cpu_s: float | None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def ladder(quick: bool) -> tuple[list[float], float]:
    """(rates to try, seconds per step)."""
    if quick:
        return [50_000, 0], 0.5
    return [25_000, 50_000, 100_000, 150_000, 200_000, 300_000, 0], 3.0


def measure(quick: bool, log: Callable[[str], None]) -> list[Step]:
    rates, seconds = ladder(quick)
    tool = Natrace("natrace full", [])
    steps = []
    for rate in rates:
        iters = int((rate or 400_000) * seconds / 2)  # two events per iteration
        spec = mmap_paced(iters, rate)
        with tempfile.TemporaryDirectory(prefix="natrace-bench-") as scratch:
            try:
                run = tool.run(spec, Path(scratch))
            except (BenchError, OSError, ValueError) as err:
                steps.append(Step(rate, 0, 0, None, None, str(err)))
                log(f"[throughput {spec.name}] failed: {err}")
                continue
        step = Step(rate, run.calls, run.hot_ns / 1e9, run.events_lost,
                    run.usage.cpu_s if run.usage else None)
        steps.append(step)
        log(f"[throughput {spec.name}] {step.rate:,.0f} events/s, lost {step.events_lost}")
    return steps


def highest_lossless(steps: list[Step]) -> Step | None:
    clean = [s for s in steps if s.error is None and s.events_lost == 0]
    return max(clean, key=lambda s: s.rate, default=None)
