"""`natrace top -p PID` / `natrace top -- CMD ARGS`: a live view of unfreed native memory.

Full-screen (Textual) on a terminal; otherwise a plain frame every interval, like
`top -b`. Either way the probes are detached on the way out and the target keeps running.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import click

from tracer.commands import common, outputs
from tracer.engine.live import LiveDriver, LiveSampler, LiveState
from tracer.engine.session import Session
from tracer.errors import NatraceError, UsageError
from tracer.files import check_directory, write_private, write_stdout
from tracer.probes import target as targets
from tracer.reporters import flamegraph_html
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.reporters.stacks import ExportOptions
from tracer.tui.app import Writer, report_name, run_tui
from tracer.tui.batch import batch_text
from tracer.tui.views import VIEWS
from tracer.units import Duration


@click.command("top")
@click.option("-p", "--pid", type=int, default=None, help="Process to attach to.")
@click.option("--interval", type=Duration(), default=1.0, show_default=True,
              help="Time between refreshes (e.g. 1s, 500ms).")
@click.option("-n", "--iterations", type=click.IntRange(min=1), default=None,
              help="When stdout is not a terminal: frames to print before detaching "
                   "(default: until the target exits or Ctrl-C).")
@click.option("--view", type=click.Choice(list(VIEWS)), default="sites", show_default=True,
              help="Table shown first (full-screen) or printed (batch).")
@common.trace_options
@common.target_output_option
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def command(pid: int | None, interval: float, iterations: int | None, view: str,
            argv: tuple[str, ...], **opts: Any) -> None:
    """Watch call sites, modules and memory of a live process, refreshed every interval.

    Give -p PID to attach, or -- CMD ARGS to launch. Leak suspects (LEAK) are sites
    whose unfreed bytes keep growing, not the largest. Keys: v/1-6 view, s sort,
    p pause, / filter, Enter stack, w write the report (-o FILE, --json),
    f write an HTML flamegraph, q quit.
    Quitting detaches every probe and leaves the process running.
    """
    args = common.TraceArgs.from_options(opts)
    if (pid is None) == (not argv):
        raise UsageError("give either -p PID or -- CMD ARGS: natrace top -p PID")
    args.check_outputs()
    if sys.stdout.isatty():  # the w and f keys write into the current directory
        check_directory(".", "the w and f keys:", os.getcwd())
    common.check_privileges()
    target = (targets.attach(pid) if pid is not None else
              args.launch(list(argv), full_screen=sys.stdout.isatty()))
    session = Session(target, args.session)
    crash = None
    try:
        session.start()
        if sys.stdout.isatty():
            last, crash = run_tui(LiveDriver(session, interval), _writer(args), view)
        else:
            common.announce(session, f"printing a frame every {interval:g} s")
            width = shutil.get_terminal_size((120, 24)).columns
            last = _run_batch(session, interval, iterations, view, width, args.top)
    finally:
        session.close()
        target.abandon()  # a failed attach: the command must not run untraced
    if last is not None:  # the last state shown, as --record and --flamegraph files
        outputs.save(last.snapshot, args.session, args.record, args.flamegraph)
    if crash is not None:  # a bug in the view: one line and exit 1, the files kept
        raise crash


def _writer(args: common.TraceArgs) -> Writer:
    """The `w` key: the current state as the run/snapshot report (-o FILE, else a
    timestamped file in the current directory); `f`: an HTML flamegraph of unfreed bytes."""
    def write(state: LiveState, what: str) -> str:
        snap = state.snapshot
        if what == "flamegraph":
            path = report_name(snap.pid, "html")
            text = flamegraph_html.render(snap, ExportOptions(title=f"natrace top {snap.pid}"))
        else:
            path = args.output or report_name(snap.pid, "json" if args.as_json else "txt")
            text = (json_report.render(snap) if args.as_json
                    else text_report.render(snap, args.top))
        try:
            write_private(path, text, "-o" if path == args.output else "w")
        except NatraceError as err:
            return str(err)
        return f"wrote {path}"
    return write


def _run_batch(session: Session, interval: float, iterations: int | None, view: str,
              width: int, limit: int) -> LiveState | None:
    """Print a frame every interval until `iterations` frames, a signal, or the target's
    exit (whose final figures are printed as one more frame); the last frame's state."""
    sampler = LiveSampler(session)
    shown: list[LiveState] = []

    def frame(s: Session) -> None:
        shown.append(sampler.sample())
        write_stdout(batch_text(shown[-1], view, width, limit))
        if iterations is not None and len(shown) >= iterations:
            s.stop_requested = "iterations"

    session.run(None, interval, frame)
    if session.stop_requested is None:  # the target exited
        frame(session)
    return shown[-1] if shown else None
