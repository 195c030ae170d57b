"""`natrace report FILE`: the run/snapshot report, read from a recording."""

from __future__ import annotations

import dataclasses

import click

from tracer.commands import outputs
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
              help="The snapshot taken at (or last before) this much tracing time "
                   "(default: the last).")
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Write the report to this file (mode 0600) instead of stdout.")
def command(file: str, as_json: bool, top: int, module: str | None, at: float | None,
            output: str | None) -> None:
    """Report what a recording held at its end (or --at a time)."""
    with Recording(file) as rec:
        snap = rec.snapshot(at)
    if module is not None:
        snap = only_module(snap, module)
    text = json_report.render(snap) if as_json else text_report.render(snap, top)
    outputs.deliver(text, output, file)


def only_module(snap: Snapshot, module: str) -> Snapshot:
    sites = [s for s in snap.sites
             if s.module_class == module or (s.frame is not None and
                                             s.frame.module_name == module)]
    return dataclasses.replace(snap, sites=sites)
