"""`natrace report FILE`: the run/snapshot report, read from a recording."""

from __future__ import annotations

import dataclasses

import click

from tracer.commands import outputs
from tracer.errors import UsageError
from tracer.model.snapshot import Snapshot
from tracer.recording import Recording
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report
from tracer.units import Duration


@click.command("report")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Call sites to list.")
@click.option("--module", "module", default=None,
              help="Only sites charged to this module class (libpq, addon:NAME, libc, ...) "
                   "or file name.")
@click.option("--at", "at", type=Duration(), default=None,
              help="The snapshot taken nearest to this much tracing time (default: the "
                   "last); the report says which.")
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Write the report to this file (mode 0600) instead of stdout.")
def command(file: str, as_json: bool, top: int, module: str | None, at: float | None,
            output: str | None) -> None:
    """Report what a recording held at its end (or --at a time)."""
    with Recording(file) as rec:
        snap, which = rec.chosen(at)
    if which:
        snap = dataclasses.replace(snap, notes=[*snap.notes, f"this is {which}"])
    if module is not None:
        snap = only_module(snap, module)
    text = json_report.render(snap) if as_json else text_report.render(snap, top)
    outputs.deliver(text, output, file)


def only_module(snap: Snapshot, module: str) -> Snapshot:
    """The snapshot with only the sites charged to `module` (a module class or file
    name); an unknown name is an error listing the ones there are."""
    sites = [s for s in snap.sites
             if s.module_class == module or (s.frame is not None and
                                             s.frame.module_name == module)]
    if not sites:
        known = sorted({s.module_class for s in snap.sites})
        raise UsageError(f"no call site is charged to module {module!r} in this snapshot "
                         f"(modules: {', '.join(known) or 'none'})")
    return dataclasses.replace(snap, sites=sites)
