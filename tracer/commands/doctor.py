"""`natrace doctor`: check that this machine and this user can trace (see tracer.probes.doctor)."""

from __future__ import annotations

import json

import click

from tracer.probes import doctor

_STYLE = {"ok": "green", "warn": "yellow", "fail": "red", "info": "blue"}


def _table(results: list[doctor.CheckResult]) -> str:
    width = max(len("check"), *(len(r.name) for r in results))
    lines = [f"{'check':<{width}}  {'status':<6}  detail"]
    for r in results:
        status = click.style(f"{r.status:<6}", fg=_STYLE[r.status], bold=r.failed)
        lines.append(f"{r.name:<{width}}  {status}  {r.detail}")
        if r.fix and r.status in ("fail", "warn"):
            lines.append(f"{'':<{width}}  {'':<6}  fix: {r.fix}")
    return "\n".join(lines)


@click.command("doctor")
@click.option(
    "--tracefs",
    "tracefs",
    metavar="PATH",
    type=click.Path(file_okay=False),
    default=None,
    help="Check this tracefs mount instead of /sys/kernel/tracing (or /sys/kernel/debug/tracing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as a JSON list.")
@click.pass_context
def command(ctx: click.Context, tracefs: str | None, as_json: bool) -> None:
    """Check that natrace can trace on this machine; exit 1 if it cannot."""
    results = doctor.run_checks(tracefs=tracefs)
    ok = doctor.tracing_will_work(results)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        click.echo(_table(results))
        failed = sum(r.failed for r in results)
        if ok:
            click.echo("\nnatrace can trace on this machine.")
        else:
            click.echo(f"\n{failed} check(s) failed: natrace cannot trace until they are fixed.")
    ctx.exit(0 if ok else 1)
