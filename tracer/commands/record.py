"""`natrace record`: trace a process and save a snapshot every interval to a recording
(tracer.recording), for `natrace report`, `diff` and `flamegraph` later, elsewhere."""

from __future__ import annotations

from typing import Any

import click

from tracer.commands import common
from tracer.engine.recordings import new_recording
from tracer.engine.session import Session
from tracer.errors import UsageError
from tracer.files import check_output
from tracer.probes import target as targets
from tracer.recording import RecordingWriter
from tracer.units import Duration


@click.command("record")
@click.option("-p", "--pid", type=int, default=None, help="Process to attach to.")
@click.option("-o", "--output", "output", required=True, type=click.Path(),
              help="Recording file to write (SQLite, mode 0600).")
@click.option("--duration", type=Duration(), default=None,
              help="Stop after this long (default: when the target exits, or Ctrl-C).")
@click.option("--interval", type=Duration(), default=5.0, show_default=True,
              help="Time between snapshots.")
@common.session_options
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, pid: int | None, output: str, duration: float | None,
            interval: float, argv: tuple[str, ...], **opts: Any) -> None:
    """Record -p PID, or -- CMD ARGS from its start, to a self-contained file.

    Each snapshot is committed as it is taken: a recording cut short (even by SIGKILL)
    keeps every snapshot before. Exits with the command's exit code when launched.
    """
    if (pid is None) == (not argv):
        raise UsageError("give either -p PID or -- CMD ARGS")
    options = common.session_from_options(opts)
    check_output(output, "-o", regular_only=True)
    common.check_privileges()
    target = targets.attach(pid) if pid is not None else targets.launch(list(argv))
    session = Session(target, options)
    writer: RecordingWriter | None = None
    count = 0

    def take(s: Session) -> None:
        nonlocal count
        assert writer is not None
        writer.add(s.snapshot())
        count += 1

    try:
        writer = new_recording(output, target.pid, " ".join(target.argv), options,
                                       interval)
        session.start()
        common.announce(session, f"recording to {output} every {interval:g} s")
        session.run(duration, interval, take)
        take(session)
    finally:
        session.close()
        if writer is not None:
            writer.close()
        target.abandon()  # a failed attach: the command must not run untraced
    click.echo(f"natrace: {count} snapshots recorded to {output}", err=True)
    ctx.exit(target.wait() or 0)
