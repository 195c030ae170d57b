"""Memory limits on a watched process and what to do when one trips: shared by
`natrace guard` (one process, then exit) and `natrace agent` (every process, in
allocation windows). Actions only ever signal the target.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from tracer.engine.session import Session
from tracer.errors import UsageError
from tracer.probes.target import Target
from tracer.units import format_size, parse_duration, parse_size


@dataclass(frozen=True)
class Limits:
    rss: int | None
    growth: tuple[int, float] | None  # (bytes, seconds)

    def tripped(self, session: Session) -> str | None:
        """Why a limit has tripped, or None."""
        timeline = session.memory.timeline
        last = timeline.last
        if last is None:
            return None
        if self.rss is not None and last.rss > self.rss:
            return (f"RSS {format_size(last.rss)} over the limit "
                    f"{format_size(self.rss)}")
        if self.growth is not None:
            nbytes, seconds = self.growth
            grown = timeline.growth(seconds)
            if grown is not None and grown > nbytes:
                return (f"RSS grew {format_size(grown)} in {seconds:g} s, over the limit "
                        f"{format_size(nbytes)}/{seconds:g} s")
        return None


@dataclass(frozen=True)
class Action:
    kind: str  # "report", "signal" or "kill"
    signal: signal.Signals | None = None

    def describe(self) -> str:
        if self.kind == "signal" and self.signal is not None:
            return f"send {self.signal.name}"
        return {"report": "write the report only", "kill": "SIGTERM, then SIGKILL"}[self.kind]


def parse_action(text: str) -> Action:
    if text in ("report", "kill"):
        return Action(text)
    if text.startswith("signal:"):
        name = text.split(":", 1)[1].upper()
        try:
            sig = signal.Signals(int(name)) if name.isdigit() else signal.Signals[
                name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError):
            raise UsageError(f"--action: unknown signal {name!r} (e.g. signal:USR1, "
                             "signal:TERM)") from None
        return Action("signal", sig)
    raise UsageError(f"--action: {text!r} is not report, kill or signal:NAME")


def parse_limits(rss: str | None, growth: str | None) -> Limits:
    if rss is None and growth is None:
        raise UsageError("give --rss-limit SIZE and/or --growth SIZE/INTERVAL")
    try:
        rss_bytes = None if rss is None else parse_size(rss)
    except ValueError as err:
        raise UsageError(f"--rss-limit: {err}") from None
    growth_limit = None
    if growth is not None:
        size_text, _, window = growth.partition("/")
        try:
            growth_limit = (parse_size(size_text), parse_duration(window or "<missing>"))
        except ValueError as err:
            raise UsageError(f"--growth: {err}; write SIZE/INTERVAL, e.g. 100M/10s") from None
        if growth_limit[1] <= 0:
            raise UsageError("--growth: the interval must be more than zero")
    return Limits(rss_bytes, growth_limit)


def act(target: Target, action: Action, grace: float) -> str:
    """Do what --action says to the target (and only to it); say what happened."""
    pid = target.pid
    try:
        if action.kind == "signal" and action.signal is not None:
            os.kill(pid, action.signal)
            return f"sent {action.signal.name} to PID {pid}"
        if action.kind == "kill":
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not target.alive():
                    return f"PID {pid} ended after SIGTERM"
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            return f"PID {pid} ignored SIGTERM for {grace:g} s: sent SIGKILL"
    except ProcessLookupError:
        return f"PID {pid} had already exited: nothing to signal"
    return "report only: PID left running"
