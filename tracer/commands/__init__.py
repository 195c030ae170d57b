"""One module per CLI verb; each exposes a click command named `command`."""

from __future__ import annotations

import click

from tracer.commands import doctor, guard, run, snapshot, top

COMMANDS: list[click.Command] = [doctor.command, run.command, snapshot.command, top.command,
                                 guard.command]
