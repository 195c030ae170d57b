"""One module per CLI verb; each exposes a click command named `command`."""

from __future__ import annotations

import click

from tracer.commands import (
    agent,
    diff,
    doctor,
    flamegraph,
    guard,
    record,
    report,
    run,
    snapshot,
    top,
)

COMMANDS: list[click.Command] = [doctor.command, run.command, snapshot.command, top.command,
                                 record.command, report.command, diff.command,
                                 flamegraph.command, guard.command, agent.command]
