"""`natrace guard -p PID --rss-limit SIZE`: watch a process's memory; when a limit trips,
write a full report first, then act (nothing, a signal, or SIGTERM then SIGKILL).

The guard replaces a `watch | awk` one-liner that killed a process past 1 GB and kept
nothing: by the time it acts, the report (top call sites when tracing, regions,
arenas, where RSS goes) is already on disk. It only ever signals the target.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from tracer.commands import common
from tracer.engine.limits import Action, Limits, act, parse_action, parse_limits
from tracer.engine.session import Session, SessionOptions
from tracer.errors import UsageError
from tracer.files import prepare_dir, write_private
from tracer.model.snapshot import Snapshot
from tracer.probes import target as targets
from tracer.probes.alloc import AllocOptions
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.units import Duration, format_size, parse_size

TRIPPED = 6  # guard's exit code when a limit tripped (0: the target exited or guard stopped)


@click.command("guard")
@click.option("-p", "--pid", type=int, required=True, help="Process to guard.")
@click.option("--rss-limit", "rss_limit", metavar="SIZE", default=None,
              help="Trip when RSS exceeds this (e.g. 512M, 1GiB).")
@click.option("--growth", metavar="SIZE/INTERVAL", default=None,
              help="Trip when RSS grows more than SIZE within INTERVAL (e.g. 100M/10s).")
@click.option("--action", "action_text", default="report", show_default=True,
              help="What to do after the report: report, signal:NAME (e.g. signal:USR1), "
                   "or kill (SIGTERM, then SIGKILL after --grace).")
@click.option("--report-dir", "report_dir", type=click.Path(), default=".",
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
    """Watch PID's memory; past a limit, write a report, then act on the process.

    Exits 6 when a limit tripped (report written, action taken), 0 when the process
    exited or guard was stopped first.
    """
    limits = parse_limits(rss_limit, growth)
    action = parse_action(action_text)
    try:
        sample_bytes = parse_size(sample) if sample else 0
    except ValueError as err:
        raise UsageError(f"--sample: {err}") from None
    prepare_dir(report_dir, "--report-dir")
    if not no_trace:
        common.check_privileges()
    target = targets.attach(pid)
    options = SessionOptions(alloc=AllocOptions(sample_bytes=sample_bytes),
                             allocs=not no_trace, triage=False if no_trace else None,
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
    click.echo(f"natrace guard: {act(target, action, grace)}", err=True)
    click.get_current_context().exit(TRIPPED)


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
    write_private(path, text, "--report-dir")
    return path
