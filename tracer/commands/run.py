"""`natrace run -- CMD ARGS`: launch a command with probes in place, report at its exit."""

from __future__ import annotations

import click

from tracer import target as targets
from tracer.commands import common


@click.command("run", context_settings={"ignore_unknown_options": False})
@common.trace_options
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, argv: tuple[str, ...], top: int, as_json: bool, output: str | None,
            sample: int | None, min_age: float | None, charge_to: str, max_allocs: int,
            stack_map_size: int) -> None:
    """Run CMD from its first allocation and report what it left unfreed.

    Exits with the command's exit code.
    """
    options = common.session_options(sample, min_age, charge_to, max_allocs, stack_map_size)
    common.check_privileges()
    target = targets.launch(list(argv))
    try:
        snap = common.trace(target, options, duration=None)
    finally:
        target.release()  # a failed attach must not leave the child at its gate
    common.print_report(snap, as_json, top, output)
    code = target.wait()
    ctx.exit(code or 0)
