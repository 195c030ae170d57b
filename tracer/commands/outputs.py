"""Saving a traced snapshot beyond the report: recordings and flamegraph files.

Shared by `natrace record` and the `--record`/`--flamegraph` options of run and
snapshot, and by `natrace flamegraph` for exports from a recording.
"""

from __future__ import annotations

from tracer.engine.session import SessionOptions
from tracer.files import check_output, write_private, write_stdout
from tracer.model.snapshot import Snapshot
from tracer.reporters import export
from tracer.reporters.stacks import METRICS, ExportOptions


def write_file(path: str, data: str | bytes, *sources: str, option: str = "-o") -> None:
    """Write by tracer/files.py's rules; never over one of `sources`, the files read."""
    check_output(path, option, sources)
    write_private(path, data, option)


def deliver(text: str, output: str | None, *sources: str) -> None:
    """A report to -o FILE, or to stdout (robust to a non-blocking or closed stdout)."""
    if output:
        write_file(output, text, *sources)
    else:
        write_stdout(text)


def write_export(path: str, fmt: str, snap: Snapshot, options: ExportOptions,
                 *sources: str, option: str = "-o") -> None:
    write_file(path, export.render(fmt, snap, options), *sources, option=option)


def check(record: str | None, flamegraph: str | None) -> None:
    """Refuse a --record or --flamegraph path that could not be written, or a flamegraph
    format that is unknown, before tracing rather than after."""
    if record:
        check_output(record, "--record", regular_only=True)
    if flamegraph:
        check_output(flamegraph, "--flamegraph")
        export.format_for(flamegraph)


def save(snap: Snapshot, options: SessionOptions, record: str | None,
         flamegraph: str | None) -> None:
    """The --record and --flamegraph files asked for on run or snapshot."""
    if not (record or flamegraph):
        return
    from tracer.engine.recordings import build_ids, new_recording  # sqlite3: when asked

    if record:
        with new_recording(record, snap.pid, snap.command, options, None,
                           "--record") as rec:
            rec.add(snap)
    if flamegraph:
        fmt = export.format_for(flamegraph)
        write_export(flamegraph, fmt, snap,
                     ExportOptions(METRICS["unfreed"],
                                   build_ids=build_ids(snap) if fmt == "pprof" else {}),
                     option="--flamegraph")
