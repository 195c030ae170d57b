"""The `natrace` command: a click group over one module per verb in tracer.commands.

Expected failures (NatraceError) become one line on stderr and their exit code;
a traceback is shown only with --debug.
"""

from __future__ import annotations

import sys

import click

from tracer import __version__
from tracer.commands import COMMANDS
from tracer.errors import NatraceError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except NatraceError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"natrace: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="natrace")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for failures.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Trace native memory allocations of a live Linux process with eBPF."""
    ctx.obj = {"debug": debug}


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    try:
        cli(prog_name="natrace")
    except BrokenPipeError:
        sys.exit(1)
