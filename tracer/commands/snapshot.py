"""`natrace snapshot` (placeholder until implemented)."""

from __future__ import annotations

import click


@click.command("snapshot")
def command() -> None:
    """Not implemented yet."""
    raise click.ClickException("not implemented yet")
