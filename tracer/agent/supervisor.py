"""One watched process: triage probes all the time (tracepoints only, cheap enough for
days), and allocation tracing for a bounded window when its memory trips a limit.

Each window ends with a recording and a report written to --record-dir (0600) and,
as with `natrace guard`, the action asked for (nothing, a signal, or a kill). A process
escalates at most once per --cooldown, and never while the agent is over its budget.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tracer.agent.budget import Budget
from tracer.agent.discovery import Proc
from tracer.engine.limits import Action, Limits, act
from tracer.engine.recordings import new_recording
from tracer.engine.session import Session, SessionOptions
from tracer.errors import NatraceError
from tracer.files import write_private
from tracer.model import books
from tracer.model.snapshot import Snapshot
from tracer.probes import target as targets
from tracer.probes.handles import HandleOptions
from tracer.probes.sampler import firing_probes
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.units import format_size


@dataclass(frozen=True)
class WatchConfig:
    """What every supervisor is told (from the command line)."""

    limits: Limits | None  # None: never escalate, triage only
    action: Action
    window: float  # seconds of allocation tracing per escalation
    cooldown: float  # seconds before the same process may escalate again
    record_dir: str
    interval: float  # seconds between memory checks
    top: int = 10  # call sites in reports and in the growth metric
    as_json: bool = False
    grace: float = 5.0  # --action kill: SIGTERM to SIGKILL
    session: SessionOptions = field(default_factory=SessionOptions)  # charge-to, locks...


@dataclass(frozen=True)
class SiteRate:
    module: str
    site: str
    bytes_per_second: float


@dataclass(frozen=True)
class ProcessFigures:
    """What the metrics and profiles show of one process: an immutable copy, so the
    HTTP thread never reads a supervisor mid-update."""

    pid: int
    comm: str
    mode: str  # "triage", "allocations" (a window) or "sampled" (in-process sampler)
    probes: int
    rss: int | None
    escalations: int
    modules: tuple[tuple[str, int, int], ...] = ()  # module class, unfreed bytes, blocks
    sites: tuple[SiteRate, ...] = ()  # fastest-growing sites, at most `top`
    handles: tuple[tuple[str, int], ...] = ()  # handle type, live
    contended_locks: int = 0
    lost: tuple[tuple[str, int], ...] = ()  # what the probes could not record, by kind
    # the allocator's books, the RSS split and the verdict: (metric, labels, value)
    memory: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...] = ()


Log = Callable[[str], None]


class Supervisor:
    def __init__(self, proc: Proc, config: WatchConfig, budget: Budget, log: Log) -> None:
        self.proc = proc
        self.config = config
        self.budget = budget
        self.log = log
        self.target = targets.attach(proc.pid)
        triage = replace(config.session, allocs=False, triage=True,
                         memory_interval=config.interval)
        self.triage = Session(self.target, triage)
        self.window: Session | None = None
        self.window_reason = ""
        self.window_ends = 0.0
        self.next_escalation = 0.0
        self.escalations = 0
        self.held_back = False  # a limit tripped while over budget (said once)
        self.ended = False
        self.allocations: Snapshot | None = None  # the last allocation window's figures
        self.triaged: Snapshot | None = None  # the last triage figures (locks, handles)
        self.unpushed: Snapshot | None = None  # allocation figures not yet sent to Pyroscope
        self.reports: list[str] = []  # files written, newest last
        self._seen = (0, 0)  # probe hits counted so far: allocator calls, syscalls
        # the process samples itself (otel_memory probes): allocation tracing all the
        # time at the sampler's cost; a tripped limit writes a report from it, no window
        self.sampler = bool(firing_probes(self.target.pid, self.target.mapped_files())[0])

    def start(self) -> None:
        with self.budget.setup():
            self.triage.start()
        if self.sampler:
            self.open_allocations("the in-process sampler is loaded", None)

    @property
    def probe_count(self) -> int:
        return self.triage.probe_count + (self.window.probe_count if self.window else 0)

    def tick(self) -> None:
        """Drain the probes, check the limits; start or end an allocation window."""
        if not self.triage.poll():
            self.ended = True
        if self.window is not None:
            if not self.window.poll():
                self.ended = True
            if self.ended or time.monotonic() >= self.window_ends:
                self.finish_window()
        if not self.ended and self.config.limits is not None and (
                self.window is None or self.sampler):
            why = self.config.limits.tripped(self.triage)
            if why is not None and time.monotonic() >= self.next_escalation:
                if self.sampler:
                    self.next_escalation = time.monotonic() + self.config.cooldown
                    self.escalations += 1
                    self.report_now(why)
                elif self.budget.over:
                    self.next_escalation = time.monotonic() + self.config.interval
                    if not self.held_back:
                        self.log(f"PID {self.proc.pid} ({self.proc.comm}): {why}, but natrace "
                                 "is over --max-overhead: triage only until it is not")
                    self.held_back = True
                else:
                    self.next_escalation = time.monotonic() + self.config.cooldown
                    self.open_allocations(why, self.config.window * self.budget.window_share)

    def open_allocations(self, reason: str, seconds: float | None) -> None:
        """Allocation probes for a window of `seconds` (None: for as long as the process
        is watched), sampled as --sample and the budget say."""
        period = max(self.config.session.alloc.sample_bytes, self.budget.sample_bytes)
        options = replace(self.config.session, allocs=True, triage=False,
                          alloc=replace(self.config.session.alloc, sample_bytes=period),
                          handles=HandleOptions(presets=False),
                          memory_interval=self.config.interval)
        session = Session(self.target, options)
        try:
            with self.budget.setup():
                session.start()
        except NatraceError as err:
            session.close()
            self.log(f"PID {self.proc.pid} ({self.proc.comm}): {reason}; allocation tracing "
                     f"failed: {err}")
            return
        self.window, self.window_reason = session, reason
        self._seen = (0, self._seen[1])
        probes = f"{session.probe_count} probes"
        if seconds is None:
            self.window_ends = float("inf")
            period = session.probes.period
            mean = f", mean {format_size(period)}" if period else ""
            self.log(f"PID {self.proc.pid} ({self.proc.comm}): {reason}: sampled allocation "
                     f"tracing while it runs ({probes}{mean})")
            return
        self.window_ends = time.monotonic() + seconds
        self.escalations += 1
        sampled = f", sampled every {format_size(period)}" if period else ""
        self.log(f"PID {self.proc.pid} ({self.proc.comm}): {reason}: allocation tracing for "
                 f"{seconds:g} s ({probes}{sampled})")

    def end_window(self, why: str) -> None:
        """End a window before its time (the budget, SIGUSR1); its files still written.
        A sampled process keeps its probes (they are the cheap path): a report now."""
        if self.window is not None and self.sampler:
            self.report_now(why)
        elif self.window is not None:
            self.window_reason += f"; {why}"
            self.finish_window(f" ({why})")

    def report_now(self, reason: str) -> None:
        """The sampled session's figures now, written and acted on; the probes stay."""
        if self.window is None:
            return
        self.window.poll()
        snap = self.window.snapshot()
        self.allocations = self.unpushed = snap
        self.window_reason = reason
        self._write(snap, self.window.options, "")

    def finish_window(self, early: str = "") -> None:
        """Snapshot, detach, write the recording and the report, then act (a sampled
        process: only detach, its figures kept for the metrics and the last push)."""
        session, self.window = self.window, None
        if session is None:
            return
        try:
            session.poll()  # what the ring buffer still holds (mappings) counts too
            snap = session.snapshot()
        finally:
            with self.budget.setup():
                session.close()
        self.allocations = self.unpushed = snap
        if not self.sampler:  # a sampled process writes files only when a limit trips
            self._write(snap, session.options, early)

    def _write(self, snap: Snapshot, options: SessionOptions, early: str) -> None:
        """The recording and the report of an allocation window (or a sampled process's
        figures), then the action."""
        stem = os.path.join(self.config.record_dir, "natrace-agent-{}-{}".format(
            snap.pid, time.strftime("%Y%m%d-%H%M%S", time.localtime(snap.taken_at))))
        try:
            with new_recording(stem + ".natrace", snap.pid, snap.command, options,
                               None) as rec:
                rec.add(snap)
            report = stem + (".json" if self.config.as_json else ".txt")
            write_private(report, self._report(snap))
        except (NatraceError, OSError) as err:
            self.log(f"PID {snap.pid}: could not write the window's files: {err}")
            return
        self.reports += [stem + ".natrace", report]
        done = "" if self.ended else "; " + act(self.target, self.config.action,
                                                self.config.grace)
        what = "sampled figures written" if self.sampler else f"allocation window over{early}"
        self.log(f"PID {snap.pid} ({self.proc.comm}): {what}; report {report}, recording "
                 f"{stem}.natrace{done}")

    def _report(self, snap: Snapshot) -> str:
        head = {"reason": self.window_reason, "action": self.config.action.describe()}
        if self.config.as_json:
            doc: dict[str, Any] = json_report.to_dict(snap)
            doc["agent"] = head
            return json.dumps(doc, indent=2) + "\n"
        return (f"natrace agent: {head['reason']}; action: {head['action']}\n"
                + text_report.render(snap, self.config.top))

    def refresh(self) -> None:
        """Symbolize what the probes hold now (the slow part: done every push interval,
        not every tick)."""
        if not self.ended:
            self.triaged = self.triage.snapshot()
        if self.window is not None:
            self.allocations = self.unpushed = self.window.snapshot()

    def hits(self) -> tuple[int, int]:
        """Probe hits since the last call: (allocator calls, syscall tracepoint calls)."""
        calls = sum(self.window.probes.counters()[1].values()) if self.window else 0
        syscalls = 0
        if self.triage.triage is not None:
            syscalls = (sum(m.calls for m in self.triage.triage.memsys() if m.stack_id is None)
                        + sum(f.calls for f in self.triage.triage.futexes()))
        seen, self._seen = self._seen, (calls, syscalls)
        return max(0, calls - seen[0]), max(0, syscalls - seen[1])

    def figures(self) -> ProcessFigures:
        last = self.triage.memory.timeline.last
        mode = "triage" if self.window is None else "sampled" if self.sampler else "allocations"
        fig = ProcessFigures(self.proc.pid, self.proc.comm, mode,
                             self.probe_count, last.rss if last else None, self.escalations)
        alloc, tri = self.allocations, self.triaged
        lost: dict[str, int] = {}
        if alloc is not None:
            rates = sorted((s for s in alloc.user_sites() if s.per_minute),
                           key=lambda s: -(s.per_minute or 0))[:self.config.top]
            fig = replace(fig, modules=tuple((m, b, n) for m, b, n, _ in alloc.by_module()),
                          sites=tuple(SiteRate(s.module_class, s.label(),
                                               (s.per_minute or 0) / 60) for s in rates))
            lost.update(alloc.loss)
        if tri is not None:
            fig = replace(fig, handles=tuple((h.name, h.live) for h in tri.handles),
                          contended_locks=len(tri.locks.contended()) if tri.locks else 0)
            for kind, n in tri.triage_loss.items():
                lost[kind] = lost.get(kind, 0) + n
            if tri.memory is not None:
                m = tri.memory
                fig = replace(fig, memory=tuple(
                    (name, tuple(sorted(labels.items())), value)
                    for name, labels, value in books.metrics(m.books, m.split, m.verdict)))
        return replace(fig, lost=tuple(sorted(lost.items())))

    def close(self) -> None:
        """Finish a window in progress (its files written), then detach everything."""
        try:
            self.finish_window()
        finally:
            with self.budget.setup():
                self.triage.close()
