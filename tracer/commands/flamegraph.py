"""`natrace flamegraph FILE`: a recording's snapshot as a flamegraph or profile file."""

from __future__ import annotations

import os

import click

from tracer.commands import outputs
from tracer.recording import Recording
from tracer.reporters.export import FORMATS, format_for
from tracer.reporters.stacks import METRICS, ExportOptions
from tracer.units import Duration


@click.command("flamegraph")
@click.argument("file")
@click.option("--metric", type=click.Choice(list(METRICS)), default="unfreed",
              show_default=True, help="What the widths measure.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None,
              help="Output format (default: from the output's extension).")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="File to write (mode 0600).")
@click.option("--inverted", is_flag=True, help="Icicle graph: roots at the top (html/svg).")
@click.option("--at", "at", type=Duration(), default=None,
              help="The snapshot nearest to this much tracing time (default: the last).")
def command(file: str, metric: str, fmt: str | None, output: str, inverted: bool,
            at: float | None) -> None:
    """Write FILE's sites as html, svg, folded, pprof or speedscope."""
    fmt = fmt or format_for(output)
    with Recording(file) as rec:
        snap, which = rec.chosen(at)
        build_ids = rec.build_ids
    if which:
        click.echo(f"natrace: {file}: {which}", err=True)
    title = f"{os.path.basename(file)}: {snap.command} (PID {snap.pid}), " \
            f"{METRICS[metric].description}"
    options = ExportOptions(METRICS[metric], inverted, title, build_ids)
    outputs.write_export(output, fmt, snap, options, file)
