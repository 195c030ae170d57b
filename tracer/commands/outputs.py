"""Saving a traced snapshot beyond the report: recordings and flamegraph files.

Shared by `natrace record` and the `--record`/`--flamegraph` options of run and
snapshot, and by `natrace flamegraph` for exports from a recording.
"""

from __future__ import annotations

import os

from tracer.engine.recordings import build_ids, new_recording
from tracer.engine.session import SessionOptions
from tracer.errors import UsageError
from tracer.files import write_private
from tracer.model.snapshot import Snapshot
from tracer.reporters import export
from tracer.reporters.stacks import METRICS, ExportOptions


def write_file(path: str, data: str | bytes, *sources: str) -> None:
    """Write atomically (0600); never over one of `sources`, the files read."""
    for source in sources:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise UsageError(f"{path} is an input file: choose another output")
    write_private(path, data)


def write_export(path: str, fmt: str, snap: Snapshot, options: ExportOptions,
                 *sources: str) -> None:
    write_file(path, export.render(fmt, snap, options), *sources)


def check(flamegraph: str | None) -> None:
    """Refuse a --flamegraph name whose format is unknown before tracing, not after."""
    if flamegraph:
        export.format_for(flamegraph)


def save(snap: Snapshot, options: SessionOptions, record: str | None,
         flamegraph: str | None) -> None:
    """The --record and --flamegraph files asked for on run or snapshot."""
    if record:
        with new_recording(record, snap.pid, snap.command, options, None) as rec:
            rec.add(snap)
    if flamegraph:
        fmt = export.format_for(flamegraph)
        write_export(flamegraph, fmt, snap,
                     ExportOptions(METRICS["unfreed"],
                                   build_ids=build_ids(snap) if fmt == "pprof" else {}))
