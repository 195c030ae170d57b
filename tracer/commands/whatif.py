"""`natrace whatif -- CMD ARGS`: run a command once per allocator setting and show the
RSS each run reached, side by side, so advice about arenas, trimming or jemalloc is
measured on the program itself rather than guessed.

Each run is launched held at a gate like `natrace run`, with only the triage
tracepoints (they stop it inside exit(), where its peak RSS (VmHWM), final RSS and the
allocator's books are read before it goes). The command's own output goes to stderr,
so the report (text or --json) is alone on stdout.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import click

from tracer.commands import common
from tracer.engine.session import Session, SessionOptions
from tracer.errors import TargetError, UsageError
from tracer.probes import target as targets
from tracer.units import Duration
from tracer.units import format_size as size

JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                  "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# MALLOC_TRIM_THRESHOLD_ set at glibc's default also stops glibc raising it by itself
TRIM = "131072"
NO_DECAY = "dirty_decay_ms:0,muzzy_decay_ms:0"


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str]


@dataclass
class Outcome:
    """One run: RSS reached (bytes), what the allocator held free at the end."""

    variant: str
    env: dict[str, str]
    peak_rss: int | None = None
    final_rss: int | None = None
    free_inside: int | None = None  # free inside the allocator, in RAM (glibc's books)
    verdict: str | None = None
    exit_code: int | None = None
    seconds: float = 0.0
    stopped: bool = False  # still running at --duration: stopped by natrace
    notes: list[str] = field(default_factory=list)


def jemalloc_path() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def default_variants() -> tuple[list[Variant], list[str]]:
    """As is, fewer arenas, a fixed trim threshold, jemalloc (as is, and returning freed
    pages at once: what its 10 s decay does in a long-running process)."""
    variants = [Variant("as is", {}), Variant("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}),
                Variant(f"MALLOC_TRIM_THRESHOLD_={TRIM}", {"MALLOC_TRIM_THRESHOLD_": TRIM})]
    je = jemalloc_path()
    if je is None:
        return variants, ["jemalloc not found (install libjemalloc2): its runs are left out"]
    variants += [Variant("jemalloc", {"LD_PRELOAD": je}),
                 Variant("jemalloc, no decay", {"LD_PRELOAD": je, "MALLOC_CONF": NO_DECAY})]
    return variants, []


def parse_variant(text: str) -> Variant:
    """'NAME=VALUE [NAME=VALUE...]' (shell words), e.g. 'MALLOC_ARENA_MAX=4'."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise UsageError(f"--variant {text!r}: {err}") from None
    env = {}
    for w in words:
        name, eq, value = w.partition("=")
        if not eq or not name or not name.replace("_", "").isalnum():
            raise UsageError(f"--variant {text!r}: {w!r} is not NAME=VALUE")
        env[name] = value
    if not env:
        raise UsageError("--variant needs at least one NAME=VALUE")
    return Variant(" ".join(words), env)


def run_variant(argv: list[str], variant: Variant, duration: float | None,
                interval: float) -> Outcome:
    out = Outcome(variant.name, variant.env)
    target = targets.launch(argv, env={**os.environ, **variant.env}, stdout=2)
    session = Session(target, SessionOptions(allocs=False, memory_interval=interval))
    try:
        session.start()
        session.run(duration)
        out.stopped = target.alive() and not session.exiting
        out.peak_rss = _peak_rss(target.pid)
        snap = session.snapshot()
        out.seconds = snap.duration
        mem = snap.memory
        if mem is not None and mem.last is not None:
            out.final_rss = mem.last.rss
            out.peak_rss = max(out.peak_rss or 0, max(s.rss for s in mem.timeline))
        if mem is not None and mem.books is not None:
            if mem.books.complete:
                out.free_inside = mem.books.free_resident
            elif mem.books.reason:
                out.notes.append(mem.books.reason)
        if mem is not None and mem.verdict is not None:
            out.verdict = mem.verdict.kind
    finally:
        session.close()
        target.release()
        if out.stopped:
            target.terminate()
    out.exit_code = target.wait()
    return out


def _peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of the process's RSS (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def render_text(argv: list[str], outcomes: list[Outcome], notes: list[str]) -> str:
    lines = [f"natrace whatif: {len(outcomes)} runs of {shlex.join(argv)}", "",
             f"  {'VARIANT':<30} {'PEAK RSS':>11} {'FINAL RSS':>11} {'FREE INSIDE':>12} "
             f"{'VERDICT':<13} {'EXIT':>5} {'TIME':>7}"]
    for o in outcomes:
        exit_text = "stop" if o.stopped else "-" if o.exit_code is None else str(o.exit_code)
        lines.append(f"  {o.variant[:30]:<30} {_size(o.peak_rss):>11} {_size(o.final_rss):>11} "
                     f"{_size(o.free_inside):>12} {o.verdict or '-':<13} {exit_text:>5} "
                     f"{o.seconds:>6.1f}s")
    base = outcomes[0] if outcomes else None
    best = min((o for o in outcomes if o.final_rss is not None),
               key=lambda o: o.final_rss or 0, default=None)
    if base is not None and best is not None and base.final_rss and best is not base:
        cut = 100 * (base.final_rss - (best.final_rss or 0)) / base.final_rss
        lines += ["", f"Lowest final RSS: {best.variant} ({size(best.final_rss or 0)}, "
                      f"{cut:.0f}% below {base.variant})"]
    elif base is not None:
        lines += ["", f"No variant ended below {base.variant}."]
    lines += ["", "FREE INSIDE: free memory in RAM inside glibc's arenas at the end (its "
                  "books); '-' where the allocator's books cannot be read."]
    by_note: dict[str, list[str]] = {}
    for o in outcomes:
        for n in o.notes:
            by_note.setdefault(n, []).append(o.variant)
    lines += [f"{', '.join(names)}: {n}" for n, names in by_note.items()]
    lines += notes
    return "\n".join(lines) + "\n"


def _size(n: int | None) -> str:
    return "-" if n is None else size(n)


def render_json(argv: list[str], outcomes: list[Outcome], notes: list[str]) -> str:
    doc: dict[str, Any] = {"command": argv, "runs": [asdict(o) for o in outcomes],
                           "notes": notes}
    return json.dumps(doc, indent=2) + "\n"


@click.command("whatif")
@click.option("--variant", "variants", multiple=True, metavar="'NAME=VALUE ...'",
              help="Environment of one more run (repeatable); given, it replaces the "
                   "default variants (a run as is always comes first).")
@click.option("--duration", type=Duration(), default=None,
              help="Stop each run after this long (default: wait for it to exit).")
@click.option("--interval", type=Duration(), default=0.2, show_default=True,
              help="How often RSS is sampled during each run.")
@click.option("--json", "as_json", is_flag=True, help="Write the comparison as JSON.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def command(variants: tuple[str, ...], duration: float | None, interval: float,
            as_json: bool, argv: tuple[str, ...]) -> None:
    """Run CMD under allocator settings (as is, MALLOC_ARENA_MAX=2,
    MALLOC_TRIM_THRESHOLD_, jemalloc) and compare the RSS each run reached."""
    if variants:
        chosen, notes = [Variant("as is", {})] + [parse_variant(v) for v in variants], list[str]()
    else:
        chosen, notes = default_variants()
    common.check_privileges()
    if targets.resolve_command(argv[0]) is None:  # before any run starts: one line
        raise TargetError(f"command not found: {argv[0]}")
    outcomes = []
    for v in chosen:
        click.echo(f"natrace whatif: running {v.name}", err=True)
        outcomes.append(run_variant(list(argv), v, duration, interval))
    render = render_json if as_json else render_text
    sys.stdout.write(render(list(argv), outcomes, notes))
    sys.stdout.flush()
