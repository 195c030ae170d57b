"""The agent loop: discover, supervise, keep the budget, publish.

Every --interval: rescan for matching processes (attach triage probes to new ones,
detach from ended ones), let each supervisor drain its probes and check its limits,
and publish a fresh view for /metrics. Every --push-interval: symbolize (the costly
part) and push profiles. Runs on a worker thread; the main thread only waits for a
stop signal, so no session ever installs its own signal handlers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from tracer.agent.budget import Budget
from tracer.agent.discovery import Discovery, Proc, Selector
from tracer.agent.metrics import AgentCollector, AgentView
from tracer.agent.pyroscope import Pusher
from tracer.agent.supervisor import Supervisor, WatchConfig
from tracer.errors import NatraceError


@dataclass(frozen=True)
class AgentOptions:
    selector: Selector
    watch: WatchConfig
    push_interval: float
    max_overhead: float  # share of one CPU
    service: str | None = None  # Pyroscope's service_name; default: each process's comm


class Agent:
    def __init__(self, options: AgentOptions, collector: AgentCollector,
                 pusher: Pusher | None, log: Callable[[str], None]) -> None:
        self.options = options
        self.collector = collector
        self.pusher = pusher
        self.log = log
        self.discovery = Discovery(options.selector)
        self.budget = Budget(options.max_overhead, period=max(options.watch.interval, 1.0))
        self.supervisors: dict[int, Supervisor] = {}
        self.escalations_before = 0  # of supervisors already dropped
        self.attach_failures = 0
        self.ended = 0
        self.loops = 0
        self._me = psutil.Process()
        self._next_refresh = 0.0
        self.end_windows = threading.Event()  # SIGUSR1: end every allocation window now

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set; every probe is removed on the way out, whatever happens."""
        try:
            while not stop.is_set():
                began = time.monotonic()
                self.step()
                stop.wait(max(0.0, self.options.watch.interval - (time.monotonic() - began)))
        finally:
            for pid in list(self.supervisors):
                self._drop(pid, "the agent is stopping")

    def step(self) -> None:
        self.loops += 1
        if self.end_windows.is_set():
            self.end_windows.clear()
            for sup in self.supervisors.values():
                sup.end_window("ended by SIGUSR1")
        new, ended = self.discovery.scan()
        for proc in ended:
            if proc.pid in self.supervisors:
                self._drop(proc.pid, "ended")
                self.ended += 1
        for proc in new:
            self._watch(proc)
        for pid, sup in list(self.supervisors.items()):
            sup.tick()
            self._push(sup)
            if sup.ended and sup.triage.execd:
                # a new program in the same process (`sh -c 'exec node ...'`): looked
                # at afresh by the next scan, and watched again if it matches
                self._drop(pid, "exec'd another program")
                self.discovery.forget(pid)
            elif sup.ended:
                self._drop(pid, "ended")
                self.ended += 1
        self._keep_budget()
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.options.push_interval
            self._refresh()
        self.publish()

    def _watch(self, proc: Proc) -> None:
        try:
            sup = Supervisor(proc, self.options.watch, self.budget, self.log)
            sup.start()
        except NatraceError as err:
            self.attach_failures += 1
            self.log(f"PID {proc.pid} ({proc.comm}): not watched: {err}")
            return
        self.supervisors[proc.pid] = sup
        self.log(f"watching PID {proc.pid} ({proc.comm}): triage, {sup.probe_count} probes")

    def _drop(self, pid: int, why: str) -> None:
        sup = self.supervisors.pop(pid)
        try:
            sup.close()
        finally:
            self._push(sup)
            self.escalations_before += sup.escalations
            self.log(f"PID {pid} ({sup.proc.comm}) {why}: probes removed")

    def _keep_budget(self) -> None:
        for sup in self.supervisors.values():
            self.budget.charge(*sup.hits())
        if self.budget.due() and self.budget.settle():
            for sup in self.supervisors.values():
                if sup.window is not None and not sup.sampler:
                    self.budget.fallbacks += 1
                    sup.end_window("ended early to stay within --max-overhead")

    def _refresh(self) -> None:
        """Symbolize each process's figures; push the allocation windows' profiles."""
        for sup in self.supervisors.values():
            sup.refresh()
            self._push(sup)

    def _push(self, sup: Supervisor) -> None:
        """Queue allocation figures not sent yet (the pusher's thread does the sending)."""
        snap, sup.unpushed = sup.unpushed, None
        if snap is not None and self.pusher is not None:
            self.pusher.submit(snap, self.options.service or sup.proc.comm)

    def publish(self) -> None:
        sups = list(self.supervisors.values())
        self.collector.view = AgentView(
            processes=tuple(s.figures() for s in sups),
            budget=self.budget.state(),
            rss=self._me.memory_info().rss,
            escalations=self.escalations_before + sum(s.escalations for s in sups),
            attach_failures=self.attach_failures,
            ended=self.ended,
            loops=self.loops,
            pushes=self.pusher.counts() if self.pusher else None)
