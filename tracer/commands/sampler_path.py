"""`natrace sampler-path`: where the in-process sampler library is, for service files
(`LD_PRELOAD=$(natrace sampler-path) node server.js`)."""

from __future__ import annotations

import click

from tracer.probes import sampler


@click.command("sampler-path")
def command() -> None:
    """Print the path of the in-process sampler (libnatrace_sampler.so) to LD_PRELOAD."""
    click.echo(str(sampler.library_path()))
