"""`natrace run -- CMD ARGS`: launch a command with probes in place, report at its exit."""

from __future__ import annotations

from typing import Any

import click

from tracer.commands import common
from tracer.probes import target as targets


@click.command("run")
@common.trace_options
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, argv: tuple[str, ...], **opts: Any) -> None:
    """Run CMD from its first allocation and report what it left unfreed.

    Exits with the command's exit code.
    """
    args = common.TraceArgs.from_options(opts)
    args.check_outputs()
    common.check_privileges()
    target = targets.launch(list(argv))
    try:
        common.trace(target, args, duration=None)
    finally:
        target.release()  # a failed attach must not leave the child at its gate
    ctx.exit(target.wait() or 0)
