"""`natrace run -- CMD ARGS`: launch a command with probes in place, report at its exit."""

from __future__ import annotations

from typing import Any

import click

from tracer.commands import common


@click.command("run")
@common.trace_options
@common.target_output_option
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, argv: tuple[str, ...], **opts: Any) -> None:
    """Run CMD from its first allocation and report what it left unfreed.

    Exits with the command's exit code. The command's stdout goes to natrace's stderr
    when the report is written to stdout as JSON or to a pipe or file (--target-output
    FILE to keep it elsewhere).
    """
    args = common.TraceArgs.from_options(opts)
    args.check_outputs()
    common.check_privileges()
    target = args.launch(list(argv))
    try:
        common.trace(target, args, duration=None)
    finally:
        target.abandon()  # a failed attach: the command must not run untraced
    ctx.exit(target.wait() or 0)
