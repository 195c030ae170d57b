"""`natrace snapshot -p PID`: attach to a running process, trace a while, report."""

from __future__ import annotations

from typing import Any

import click

from tracer.commands import common
from tracer.probes import target as targets
from tracer.units import Duration


@click.command("snapshot")
@click.option("-p", "--pid", type=int, required=True, help="Process to attach to.")
@click.option("--duration", type=Duration(), default=10.0, show_default=True,
              help="How long to trace (e.g. 30s, 2m); the report covers allocations made "
                   "meanwhile and still unfreed.")
@common.trace_options
def command(pid: int, duration: float, **opts: Any) -> None:
    """Attach to PID without restarting it and report unfreed native memory by call site."""
    args = common.TraceArgs.from_options(opts)
    args.check_outputs()
    common.check_privileges()
    target = targets.attach(pid)
    common.trace(target, args, duration)
