"""`natrace run` (placeholder until implemented)."""

from __future__ import annotations

import click


@click.command("run")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("not implemented yet")
