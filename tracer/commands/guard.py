"""`natrace guard -p PID --rss-limit SIZE`: watch a process's memory; when a limit trips,
write a full report first, then act (nothing, a signal, or SIGTERM then SIGKILL).

The guard replaces a `watch | awk` one-liner that killed a process past 1 GB and kept
nothing: by the time it acts, the report (top call sites when tracing, regions,
arenas, where RSS goes) is already on disk. It only ever signals the target.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import click

from tracer.commands import common
from tracer.engine.session import Session, SessionOptions
from tracer.errors import UsageError
from tracer.files import write_private
from tracer.model.snapshot import Snapshot
from tracer.probes import target as targets
from tracer.probes.alloc import AllocOptions
from tracer.probes.target import Target
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.units import Duration, format_size, parse_duration, parse_size


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


@click.command("guard")
@click.option("-p", "--pid", type=int, required=True, help="Process to guard.")
@click.option("--rss-limit", "rss_limit", metavar="SIZE", default=None,
              help="Trip when RSS exceeds this (e.g. 512M, 1GiB).")
@click.option("--growth", metavar="SIZE/INTERVAL", default=None,
              help="Trip when RSS grows more than SIZE within INTERVAL (e.g. 100M/10s).")
@click.option("--action", "action_text", default="report", show_default=True,
              help="What to do after the report: report, signal:NAME (e.g. signal:USR1), "
                   "or kill (SIGTERM, then SIGKILL after --grace).")
@click.option("--report-dir", "report_dir", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Directory for the report (files are mode 0600).")
@click.option("--interval", type=Duration(), default=1.0, show_default=True,
              help="Seconds between checks.")
@click.option("--grace", type=Duration(), default=5.0, show_default=True,
              help="With --action kill: seconds between SIGTERM and SIGKILL.")
@click.option("--no-trace", "no_trace", is_flag=True,
              help="Watch memory only (psutil and smaps): no probes, no call sites.")
@click.option("--sample", "sample", metavar="SIZE", default=None,
              help="Byte-weighted sampling of allocations (e.g. 512K). Default: exact.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Call sites in the report.")
@click.option("--json", "as_json", is_flag=True, help="Write the report as JSON.")
def command(pid: int, rss_limit: str | None, growth: str | None, action_text: str,
            report_dir: str, interval: float, grace: float, no_trace: bool,
            sample: str | None, top: int, as_json: bool) -> None:
    """Watch PID's memory; past a limit, write a report, then act on the process."""
    limits = parse_limits(rss_limit, growth)
    action = parse_action(action_text)
    try:
        sample_bytes = parse_size(sample) if sample else 0
    except ValueError as err:
        raise UsageError(f"--sample: {err}") from None
    _prepare_dir(report_dir)
    if not no_trace:
        common.check_privileges()
    target = targets.attach(pid)
    options = SessionOptions(alloc=AllocOptions(sample_bytes=sample_bytes),
                             allocs=not no_trace, triage=not no_trace,
                             memory_interval=interval)
    session = Session(target, options)
    try:
        session.start()
        click.echo(f"natrace guard: watching PID {pid} every {interval:g} s "
                   f"({_describe(limits)}; then {action.describe()})", err=True)
        reason = _watch(session, limits, interval)
        if reason is None:
            if not target.alive():
                click.echo(f"natrace guard: PID {pid} exited; no limit tripped", err=True)
            else:
                click.echo(f"natrace guard: stopped ({session.stop_requested}); no limit "
                           "tripped", err=True)
            return
        snap = session.snapshot()
    finally:
        session.close()
    path = _write_report(snap, reason, action, report_dir, top, as_json)
    click.echo(f"natrace guard: {reason}; report written to {path}", err=True)
    click.echo(f"natrace guard: {_act(target, action, grace)}", err=True)


def _watch(session: Session, limits: Limits, interval: float) -> str | None:
    """Check at every interval until a limit trips (its reason), or the target exits or
    the guard is stopped (None)."""
    reason: list[str] = []

    def check(sess: Session) -> None:
        why = limits.tripped(sess)
        if why is not None:
            reason.append(why)
            sess.stop_requested = "limit"

    session.run(None, interval, check)
    return reason[0] if reason else None


def _describe(limits: Limits) -> str:
    parts = []
    if limits.rss is not None:
        parts.append(f"RSS limit {format_size(limits.rss)}")
    if limits.growth is not None:
        parts.append(f"growth limit {format_size(limits.growth[0])}/"
                     f"{limits.growth[1]:g} s")
    return ", ".join(parts)


def _prepare_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--report-dir: cannot create {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"--report-dir: {path} is not writable")


def _write_report(snap: Snapshot, reason: str, action: Action, report_dir: str, top: int,
                  as_json: bool) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(snap.taken_at))
    path = os.path.join(report_dir,
                        f"natrace-guard-{snap.pid}-{stamp}.{'json' if as_json else 'txt'}")
    if as_json:
        doc: dict[str, Any] = json_report.to_dict(snap)
        doc["guard"] = {"reason": reason, "action": action.describe()}
        text = json.dumps(doc, indent=2) + "\n"
    else:
        text = (f"natrace guard: {reason}; action: {action.describe()}\n"
                + text_report.render(snap, top))
    write_private(path, text)
    return path


def _act(target: Target, action: Action, grace: float) -> str:
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
