"""`natrace diff A B`: growth per module and per site between two recordings, or two
times of one (`FILE@30s FILE@5m`) — how a leak is confirmed across a deploy."""

from __future__ import annotations

import os

import click

from tracer.commands import outputs
from tracer.errors import UsageError
from tracer.model.diff import diff
from tracer.model.snapshot import Snapshot
from tracer.recording import Recording
from tracer.reporters import diff as diff_report
from tracer.units import parse_duration


def parse_spec(spec: str) -> tuple[str, float | None]:
    """`FILE` (its last snapshot) or `FILE@TIME` (the snapshot at that tracing time)."""
    if os.path.exists(spec) or "@" not in spec:
        return spec, None
    path, _, when = spec.rpartition("@")
    try:
        return path, parse_duration(when)
    except ValueError as err:
        raise UsageError(f"{spec}: {err}") from None


def load(spec: str) -> tuple[Snapshot, str | None]:
    """The snapshot a spec names and, for FILE@TIME, which one it is."""
    path, at = parse_spec(spec)
    with Recording(path) as rec:
        return rec.chosen(at)


@click.command("diff")
@click.argument("before")
@click.argument("after")
@click.option("--json", "as_json", is_flag=True, help="Print the growth as JSON.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Call sites to list.")
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Write to this file (mode 0600) instead of stdout.")
def command(before: str, after: str, as_json: bool, top: int, output: str | None) -> None:
    """Growth from BEFORE to AFTER: each a recording FILE or FILE@TIME (e.g. rec.db@30s)."""
    (a, a_which), (b, b_which) = load(before), load(after)
    for spec, which in ((before, a_which), (after, b_which)):
        if which:
            click.echo(f"natrace: {spec}: {which}", err=True)
    d = diff(a, b)
    text = (diff_report.render_json(d, before, after) if as_json
            else diff_report.render(d, before, after, top))
    outputs.deliver(text, output, parse_spec(before)[0], parse_spec(after)[0])
