"""Saving a traced snapshot beyond the report: recordings and flamegraph files.

Shared by `natrace record` and the `--record`/`--flamegraph` options of run and
snapshot, and by `natrace flamegraph` for exports from a recording.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tracer.engine.session import SessionOptions
from tracer.errors import UsageError
from tracer.files import write_private
from tracer.model import codec
from tracer.model.snapshot import Snapshot
from tracer.recording import RecordingWriter
from tracer.reporters import export
from tracer.reporters.stacks import METRICS, ExportOptions
from tracer.symbols.elfsyms import read_build_id


def build_id_reader(pid: int) -> Callable[[str], str | None]:
    """Build ids of the target's modules, read through its root (containers) first."""
    def read(path: str) -> str | None:
        return read_build_id(f"/proc/{pid}/root{path}") or read_build_id(path)
    return read


def new_recording(path: str, pid: int, command: str, options: SessionOptions,
                  interval: float | None) -> RecordingWriter:
    meta = {"pid": pid, "command": command, "interval": interval,
            "options": codec.encode(options)}
    return RecordingWriter(path, meta, build_id_reader(pid))


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
        build_ids = {}
        if fmt == "pprof":
            read = build_id_reader(snap.pid)
            modules = {f.module for s in snap.sites for f in s.frames if f.module.startswith("/")}
            build_ids = {m: b for m in modules if (b := read(m))}
        write_export(flamegraph, fmt, snap,
                     ExportOptions(METRICS["unfreed"], build_ids=build_ids))
