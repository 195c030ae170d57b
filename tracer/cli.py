"""The `natrace` command: a click group over one module per verb in tracer.commands.

Every failure ends as one line on stderr and an exit code (see README.md): usage
errors 2, NatraceErrors their own code, anything unexpected 1 with a hint to rerun
with --debug, which shows the traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from tracer import __version__, commands
from tracer.errors import NatraceError
from tracer.files import hold_standard_fds, stdout_bytes, write_fd


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
    with contextlib.suppress(OSError):  # stderr made non-blocking by a target, or gone
        write_fd(2, f"natrace: {message}\n".encode(errors="replace"))
    sys.exit(code)


def _help_command(err: click.UsageError, args: list[str]) -> str:
    """The command whose --help a usage error should point at: click blames the group
    for errors met while it hands the arguments to a command (`snapshot -p`)."""
    if err.ctx is not None and err.ctx.command is not cli:
        return err.ctx.command_path
    name = next((a for a in args if a in commands.VERBS), None)
    return f"natrace {name}" if name else "natrace"


def _stdout_closed() -> None:
    """The reader of stdout went away (`natrace report FILE | head`): end quietly with
    128 + SIGPIPE, as a shell reports a program killed by SIGPIPE (Python ignores the
    signal). stdout is pointed at /dev/null so the interpreter's last flush can't fail."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    sys.exit(128 + signal.SIGPIPE)


def _invoke(args: list[str]) -> Any:
    """What click's main() does without its own handling of errors: click turns EPIPE
    into exit 1, natrace wants 141 (and one line for everything else)."""
    try:
        with cli.make_context("natrace", args) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as done:  # --help, --version, ctx.exit(code)
        return done.exit_code
    except EOFError as err:
        raise click.Abort() from err


class _PatientFd(io.RawIOBase):
    """A descriptor written through write_fd: a stderr that a target made non-blocking
    (node does so to the pipes it is given, natrace's stderr among them) must not turn
    natrace's own messages into BlockingIOError. stdout's writes go through
    files.stdout_bytes: a full disk or a closed stdout is one line, as for a report."""

    def __init__(self, fd: int, write: Callable[[bytes], None]) -> None:
        super().__init__()
        self._fd = fd
        self._write = write

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: Any) -> int:
        self._write(bytes(data))
        return len(data)


def _patient(fd: int, write: Callable[[bytes], None], stream: Any) -> Any:
    """sys.stdout or sys.stderr written through `write` (left alone when it is no
    longer descriptor `fd`: someone redirected it in process)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if stream is not None and stream.fileno() != fd:
            return stream
    return io.TextIOWrapper(_PatientFd(fd, write), encoding=getattr(stream, "encoding", None)
                            or "utf-8", errors="backslashreplace", line_buffering=True,
                            write_through=True)


def main() -> None:
    """The console script: natrace's command, then a quick exit (see _leave)."""
    try:
        _main()
    except SystemExit as done:
        _leave(done.code)


def _main() -> None:
    hold_standard_fds()
    sys.stdout = _patient(1, stdout_bytes, sys.stdout)
    sys.stderr = _patient(2, functools.partial(write_fd, 2), sys.stderr)
    args = sys.argv[1:]
    debug = "--debug" in args[: next((i for i, a in enumerate(args)
                                      if not a.startswith("-")), len(args))]
    try:
        code = _invoke(args)
    except click.UsageError as err:
        _fail(f"{err.format_message()} (see '{_help_command(err, args)} --help')",
              err.exit_code)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except NatraceError as err:
        if debug:
            raise
        _fail(str(err), err.exit_code)
    except BrokenPipeError:
        _stdout_closed()
    except Exception as err:  # a bug: say so in one line; --debug shows where
        if debug:
            raise
        _fail(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback, and please report it)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _leave(code: str | int | None) -> None:
    """Exit without tearing the interpreter down: once the command is done, freeing
    every module's objects one by one (bcc, pyelftools, click...) took 0.05-0.15 s of
    the wall clock a user waits for (`natrace run -- true` under load). stdout and
    stderr are flushed and atexit handlers run first; a non-daemon thread still
    running (none of natrace's) or a stream that cannot be flushed gets the ordinary
    exit."""
    if not isinstance(code, int) or any(
            t.is_alive() and not t.daemon and t is not threading.main_thread()
            for t in threading.enumerate()):
        sys.exit(code)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BrokenPipeError:
        try:
            _stdout_closed()
        except SystemExit as closed:
            code = closed.code if isinstance(closed.code, int) else 1
    except OSError:
        sys.exit(code)  # e.g. a stream made non-blocking: the ordinary exit's flush
    atexit._run_exitfuncs()
    os._exit(code)
