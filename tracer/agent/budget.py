"""The agent's overhead budget (--max-overhead): what natrace costs the host, and the
knobs it turns to stay under it.

Cost is a share of one CPU: natrace's own CPU time plus an estimate of the time the
probes take inside the traced processes (probe hits times a per-hit cost measured on
the project's 2-core VMs: ~2 us for a malloc-family entry and return, well under 1 us
for a syscall tracepoint pair). Compiling and attaching probes is a one-off cost, kept
out of the estimate (a 1 s compile would otherwise end every window it opens) and
counted on its own. Over budget, the
agent first ends allocation windows early and samples the next ones harder (a larger
byte-weighted sampling period), then stops starting new windows: triage alone is what
is left. Well under budget, it relaxes the sampling back towards exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

UPROBE_HIT_NS = 2_000  # malloc-family entry + return probe, one call
TRACEPOINT_HIT_NS = 500  # syscall enter + exit tracepoints, one call
MIN_SAMPLE_BYTES = 4096
MAX_SAMPLE_BYTES = 16 << 20
MIN_WINDOW_SHARE = 1 / 8


@dataclass(frozen=True)
class BudgetState:
    """What the metrics show of the budget."""

    limit: float  # share of one CPU
    overhead: float  # the last period's estimate
    own_cpu_seconds: float
    setup_cpu_seconds: float  # compiling and attaching probes, left out of `overhead`
    sample_bytes: int  # the next allocation window's sampling period (0: exact)
    window_share: float  # share of --window the next allocation window runs
    over: bool
    fallbacks: int  # allocation windows ended early for the budget


class Budget:
    def __init__(self, limit: float, period: float = 1.0) -> None:
        self.limit = limit
        self.period = period
        self.overhead = 0.0
        self.sample_bytes = 0
        self.window_share = 1.0
        self.over = False
        self.fallbacks = 0
        self._me = psutil.Process()
        self._last_at = time.monotonic()
        self._last_cpu = self._cpu()
        self._hits_ns = 0
        self.setup_cpu = 0.0
        self._setup_in_period = 0.0

    def _cpu(self) -> float:
        t = self._me.cpu_times()
        return float(t.user + t.system)

    def charge(self, uprobe_hits: int, tracepoint_hits: int) -> None:
        """Probe hits seen in the traced processes since the last charge."""
        self._hits_ns += uprobe_hits * UPROBE_HIT_NS + tracepoint_hits * TRACEPOINT_HIT_NS

    def _other_threads(self) -> dict[int, float]:
        """CPU seconds of every thread but the calling one, by thread id."""
        me = threading.get_native_id()
        return {t.id: t.user_time + t.system_time for t in self._me.threads() if t.id != me}

    @contextmanager
    def setup(self) -> Iterator[None]:
        """Compiling and attaching: CPU left out of the estimate. That is the calling
        thread's CPU and that of the threads it starts — programs are verified on a
        loader pool, one thread per CPU (the kernel verifier runs in the thread that
        loads), which is gone by the end, so its CPU is only in the process's total.
        The threads already running (the /metrics server, the Pyroscope pusher) keep
        counting as steady overhead: the whole process's CPU less what they spent."""
        began, others = self._cpu(), self._other_threads()
        try:
            yield
        finally:
            still = self._other_threads()
            theirs = sum(cpu - others[tid] for tid, cpu in still.items() if tid in others)
            spent = max(0.0, self._cpu() - began - theirs)
            self.setup_cpu += spent
            self._setup_in_period += spent

    def due(self) -> bool:
        return time.monotonic() - self._last_at >= self.period

    def settle(self) -> bool:
        """Close a period: the overhead estimate, and the knobs turned. True when over."""
        now, cpu = time.monotonic(), self._cpu()
        wall = max(now - self._last_at, 1e-6)
        steady = max(0.0, cpu - self._last_cpu - self._setup_in_period)
        self.overhead = (steady + self._hits_ns / 1e9) / wall
        self._last_at, self._last_cpu, self._hits_ns = now, cpu, 0
        self._setup_in_period = 0.0
        self.over = self.overhead > self.limit
        if self.over:
            self.sample_bytes = min(MAX_SAMPLE_BYTES, max(MIN_SAMPLE_BYTES,
                                                          self.sample_bytes * 4))
            self.window_share = max(MIN_WINDOW_SHARE, self.window_share / 2)
        elif self.overhead < self.limit / 2:
            self.sample_bytes //= 2
            if self.sample_bytes < MIN_SAMPLE_BYTES:
                self.sample_bytes = 0
            self.window_share = min(1.0, self.window_share * 2)
        return self.over

    def state(self) -> BudgetState:
        return BudgetState(self.limit, self.overhead, self._last_cpu, self.setup_cpu,
                           self.sample_bytes,
                           self.window_share, self.over, self.fallbacks)
