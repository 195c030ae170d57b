"""The `natrace` command: a click group over one module per verb in tracer.commands.

Every failure ends as one line on stderr and an exit code (see README.md): usage
errors 2, NatraceErrors their own code, anything unexpected 1 with a hint to rerun
with --debug, which shows the traceback.
"""

from __future__ import annotations

import sys

import click

from tracer import __version__, commands
from tracer.errors import NatraceError


class _Verbs(click.Group):
    """The verbs of tracer.commands, each module imported when its verb is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(commands.VERBS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return commands.load(cmd_name) if cmd_name in commands.VERBS else None


@click.group(cls=_Verbs, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="natrace")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for failures.")
def cli(debug: bool) -> None:
    """Trace native memory allocations of a live Linux process with eBPF."""



def _fail(message: str, code: int) -> None:
    click.echo(f"natrace: {message}", err=True)
    sys.exit(code)


def main() -> None:
    args = sys.argv[1:]
    debug = "--debug" in args[: next((i for i, a in enumerate(args)
                                      if not a.startswith("-")), len(args))]
    try:
        code = cli.main(args=args, prog_name="natrace", standalone_mode=False)
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx else "natrace"
        _fail(f"{err.format_message()} (see '{where} --help')", err.exit_code)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except NatraceError as err:
        if debug:
            raise
        _fail(str(err), err.exit_code)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as err:  # a bug: say so in one line; --debug shows where
        if debug:
            raise
        _fail(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback, and please report it)", 1)
    sys.exit(code if isinstance(code, int) else 0)
