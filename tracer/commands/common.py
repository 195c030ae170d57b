"""Options and steps shared by the tracing commands (run, snapshot)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from tracer.commands import outputs
from tracer.engine.session import Session, SessionOptions
from tracer.errors import UsageError
from tracer.files import check_output, check_stdout, is_stdout, open_stream
from tracer.model.snapshot import Snapshot
from tracer.probes import target as targets
from tracer.probes.alloc import AllocOptions
from tracer.probes.handles import HandleOptions, parse_pair
from tracer.probes.privileges import require_tracing_privileges
from tracer.probes.target import Target
from tracer.probes.unwinding import UNWIND_MODES
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.symbols.attribution import parse_charge_to
from tracer.units import Duration, Size

F = TypeVar("F", bound=Callable[..., Any])

_REPORT_OPTIONS = [
    click.option("--top", "top", type=click.IntRange(min=1), default=10, show_default=True,
                 help="Call sites to list."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    click.option("-o", "--output", "output", type=click.Path(), default=None,
                 help="Write the report to this file (mode 0600) instead of stdout."),
    click.option("--record", "record", type=click.Path(), default=None,
                 help="Also save the final snapshot as a recording (see natrace record)."),
    click.option("--flamegraph", "flamegraph", type=click.Path(), default=None,
                 help="Also write an unfreed-bytes flamegraph; the format follows the "
                      "extension (.html, .svg, .folded, .pb.gz, .speedscope.json)."),
]

# What a Session needs (no report options): `natrace record` takes only these.
_SESSION_OPTIONS = [
    click.option("--sample", "sample", type=Size(), default=None,
                 help="Byte-weighted sampling: each byte recorded with probability 1/SIZE "
                      "(e.g. 512K). Default: exact; for a process with the in-process "
                      "sampler loaded, the mean bytes between its samples (default 512K)."),
    click.option("--exact", "exact", is_flag=True,
                 help="Uprobes on every allocator call even when the process has the "
                      "in-process sampler (otel_memory probes) loaded."),
    click.option("--min-age", "min_age", type=Duration(), default=None,
                 help="Leave out allocations younger than this."),
    click.option("--charge-to", "charge_to", default="first", show_default=True,
                 help="Frame that holds the bytes: 'first' outside the allocator, or "
                      "'module:NAME' (e.g. module:libpq)."),
    click.option("--max-allocs", "max_allocs", type=click.IntRange(min=1024),
                 default=AllocOptions.max_allocs,
                 show_default=True, help="Outstanding blocks the kernel map can hold."),
    click.option("--stack-map-size", "stack_map_size", type=click.IntRange(min=1024),
                 default=AllocOptions.stack_map_size, show_default=True,
                 help="Distinct stacks the kernel can hold."),
    click.option("--unwind", "unwind", type=click.Choice(UNWIND_MODES), default="auto",
                 show_default=True,
                 help="How allocation stacks are walked: 'auto' uses the objects' CFI "
                      "(.eh_frame) where their code keeps no frame pointers (libc, "
                      "libstdc++, -O2 builds), 'cfi' everywhere, 'fp' frame pointers only."),
    click.option("--no-allocs", "no_allocs", is_flag=True,
                 help="Triage mode: no malloc probes, only tracepoints (locks, memory "
                      "syscalls, page faults); cheap enough for hours in production."),
    click.option("--triage/--no-triage", "triage", default=None,
                 help="Add (or leave out) the triage tracepoints: locks, memory syscalls, "
                      "page faults. Default: on, except for a process with the in-process "
                      "sampler loaded (production mode: only what was asked for)."),
    click.option("--lock-share", "lock_share", type=click.FloatRange(0, 100), default=5.0,
                 show_default=True,
                 help="Flag a lock whose waiters are blocked more than this percentage of "
                      "the traced time (summed over threads)."),
    click.option("--lock-p99", "lock_p99", type=Duration(), default=0.010,
                 show_default="10ms", help="Flag a lock whose p99 wait is longer than this."),
    click.option("--handle", "handle_specs", multiple=True,
                 metavar="LIB:CREATE[,CREATE]:DESTROY[:ARG]",
                 help="Also count live handles of this create/destroy pair (ARG: the destroy "
                      "function's argument holding the handle, default 1), e.g. "
                      "libssl:SSL_new:SSL_free. Repeatable."),
    click.option("--children/--no-children", "children", default=None,
                 help="Also trace the processes the target forks and their descendants "
                      "(each reported on its own, and all together). Default: on for a "
                      "command natrace runs (sh -c, npm start, timeout start the program "
                      "in a child), off for -p PID."),
    click.option("--handles/--no-handles", "handles", default=None,
                 help="Add (or leave out) the built-in handle pairs (libpq PGresult/PGconn, "
                      "Node-API references). Default: on, except in production mode (the "
                      "in-process sampler loaded)."),
]


def trace_options(f: F) -> F:
    for option in reversed(_REPORT_OPTIONS + _SESSION_OPTIONS):
        f = option(f)
    return f


def session_options(f: F) -> F:
    for option in reversed(_SESSION_OPTIONS):
        f = option(f)
    return f


def session_from_options(opts: dict[str, Any]) -> SessionOptions:
    """SessionOptions from the values of session_options."""
    try:
        parse_charge_to(opts["charge_to"])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--charge-to") from None
    alloc = AllocOptions(sample_bytes=opts["sample"] or 0, max_allocs=opts["max_allocs"],
                         stack_map_size=opts["stack_map_size"],
                         probes="exact" if opts["exact"] else "auto")
    try:
        pairs = tuple(parse_pair(spec) for spec in opts["handle_specs"])
    except ValueError as err:
        raise UsageError(str(err)) from None
    return SessionOptions(alloc=alloc, charge_to=opts["charge_to"], unwind=opts["unwind"],
                          min_age=opts["min_age"] or 0.0, allocs=not opts["no_allocs"],
                          triage=opts["triage"], lock_share=opts["lock_share"] / 100,
                          lock_p99=opts["lock_p99"], children=opts["children"],
                          handles=HandleOptions(pairs, presets=opts["handles"]))


@dataclass(frozen=True)
class TraceArgs:
    """The values of trace_options, as one object commands pass along."""

    top: int
    as_json: bool
    output: str | None
    session: SessionOptions
    record: str | None = None
    flamegraph: str | None = None
    target_output: str | None = None  # run/top --target-output: the command's stdout

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> TraceArgs:
        return cls(top=opts["top"], as_json=opts["as_json"], output=opts["output"],
                   session=session_from_options(opts), record=opts["record"],
                   flamegraph=opts["flamegraph"], target_output=opts.get("target_output"))

    def check_outputs(self) -> None:
        """Every output path asked for, before anything is attached or launched: a
        report must never be lost at the end of a trace for a name that could not work."""
        if self.output:
            check_output(self.output, "-o")
        else:
            check_stdout("or give -o FILE")
        if self.target_output:
            check_output(self.target_output, "--target-output")
        outputs.check(self.record, self.flamegraph)

    def launch(self, argv: list[str], full_screen: bool = False,
               env: dict[str, str] | None = None) -> Target:
        """Launch the command with its output where it cannot corrupt natrace's: its
        stdout is natrace's stdout, except when natrace's report goes there and could be
        mixed up with it (JSON, or a pipe or file rather than a terminal): then natrace's
        stderr; under the full-screen `top`, nowhere (both streams). --target-output FILE
        takes both cases' stdout (and the full-screen case's stderr) instead. `env`
        replaces natrace's environment for the command."""
        out: int | None = None
        if self.target_output:
            out = open_stream(self.target_output, "--target-output")
        elif full_screen:
            out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        report_on_stdout = self.output is None or is_stdout(self.output)
        try:
            if out is not None:
                return targets.launch(argv, env, stdout=out,
                                      stderr=out if full_screen else None)
            if report_on_stdout and (self.as_json or not os.isatty(1)):
                return targets.launch(argv, env, stdout=2)
            return targets.launch(argv, env)
        finally:
            if out is not None:
                os.close(out)


def target_output_option(f: F) -> F:
    """--target-output, for the commands that launch CMD with a report on stdout."""
    return click.option(
        "--target-output", "target_output", type=click.Path(), default=None,
        help="Where the launched command's stdout goes (a file, device or FIFO). Default: "
             "natrace's stdout on a terminal with a text report or with -o FILE, otherwise "
             "natrace's stderr, so the report on stdout is never mixed with it.")(f)


def announce(session: Session, doing: str) -> None:
    """The stderr line that says the probes are in place (scripts and tests wait for
    'attached to PID' or 'launched PID')."""
    what = "launched" if session.target.launched else "attached to"
    click.echo(f"natrace: {what} PID {session.target.pid} ({session.probe_count} probes), "
               f"{doing}; Ctrl-C stops", err=True)
    stopped = None if session.target.launched else targets.stopped_note(session.target.pid)
    for note in [*session.target.notes, *([stopped] if stopped else [])]:
        click.echo(f"natrace: note: {note}", err=True)


def trace(target: Target, args: TraceArgs, duration: float | None) -> str | None:
    """Attach, trace until done, then deliver the report, recording and flamegraph
    before detaching (detaching takes seconds; the report shouldn't wait for it).
    Probes are detached whatever happens. Returns the name of the stop signal that
    ended the window, if one did (`run` passes it on to its command)."""
    session = Session(target, args.session)
    try:
        session.start()
        announce(session, f"tracing for {duration:g} s" if duration else
                 "tracing until it exits")
        session.run(duration)
        snap = session.snapshot()
        try:
            print_report(snap, args)
        finally:  # a closed stdout (`| head`) must not cost the recording or flamegraph
            outputs.save(snap, args.session, args.record, args.flamegraph)
    finally:
        session.close()
    return session.stop_requested


def print_report(snap: Snapshot, args: TraceArgs) -> None:
    out = json_report.render(snap) if args.as_json else text_report.render(snap, args.top)
    outputs.deliver(out, args.output)


def check_privileges() -> None:
    require_tracing_privileges()
