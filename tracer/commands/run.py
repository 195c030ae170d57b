"""`natrace run -- CMD ARGS`: launch a command with probes in place, report at its exit."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import click

from tracer.commands import common
from tracer.errors import UsageError
from tracer.probes import sampler


@click.command("run")
@common.trace_options
@common.target_output_option
@click.option("--sampled", is_flag=True,
              help="Preload natrace's in-process sampler: the command samples its own "
                   "allocations (every --sample bytes on average, default 512K) and fires "
                   "a probe for sampled ones only; a few ns per call instead of a uprobe.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, argv: tuple[str, ...], sampled: bool, **opts: Any) -> None:
    """Run CMD from its first allocation and report what it left unfreed.

    Exits with the command's exit code. A stop signal sent to natrace alone (kill,
    timeout, systemd) goes on to the command once the report is written, as perf
    record does; a Ctrl-C the terminal sent to both is not sent twice. The command's
    stdout goes to natrace's stderr when the report is written to stdout as JSON or to
    a pipe or file (--target-output FILE to keep it elsewhere).
    """
    args = common.TraceArgs.from_options(opts)
    env = None
    if sampled:
        if opts["exact"]:
            raise UsageError("--sampled and --exact exclude each other: pick one")
        period = opts["sample"] or sampler.DEFAULT_PERIOD
        env = sampled_environment(dict(os.environ), period)
        args = dataclasses.replace(args, session=dataclasses.replace(
            args.session, alloc=dataclasses.replace(args.session.alloc, sample_bytes=period,
                                                    probes="in-process")))
    args.check_outputs()
    common.check_privileges()
    target = args.launch(list(argv), env=env)
    try:
        stopped_by = common.trace(target, args, duration=None)
    finally:
        target.abandon()  # a failed attach: the command must not run untraced
    if stopped_by is not None and stopped_by in signal.Signals.__members__:
        target.pass_on(signal.Signals[stopped_by])
    ctx.exit(target.wait() or 0)


def sampled_environment(env: dict[str, str], period: int) -> dict[str, str]:
    """`env` with the sampler preloaded first (ahead of any allocator the user preloads,
    which it then forwards to) and its period set."""
    library = str(sampler.library_path())
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    return {**env, "LD_PRELOAD": " ".join([library, *[p for p in preload if p != library]]),
            "NATRACE_SAMPLER_PERIOD": str(period)}
