"""What a saved session carries beside its snapshots: the recording's meta (PID,
command, interval, options) and the GNU build ids of the modules in its stacks, read
through the target's root (containers) first. Shared by `record`, `--record`,
pprof exports and the agent's allocation windows and Pyroscope pushes.
"""

from __future__ import annotations

from collections.abc import Callable

from tracer.engine.session import SessionOptions
from tracer.model import codec
from tracer.model.snapshot import Snapshot
from tracer.recording import RecordingWriter
from tracer.symbols.elfsyms import read_build_id


def build_id_reader(pid: int) -> Callable[[str], str | None]:
    """Build ids of the target's modules, read through its root (containers) first."""
    def read(path: str) -> str | None:
        return read_build_id(f"/proc/{pid}/root{path}") or read_build_id(path)
    return read


def build_ids(snap: Snapshot) -> dict[str, str]:
    """GNU build ids of the modules in the snapshot's stacks (for pprof's mappings)."""
    read = build_id_reader(snap.pid)
    modules = {f.module for s in snap.sites for f in s.frames if f.module.startswith("/")}
    return {m: b for m in modules if (b := read(m))}


def new_recording(path: str, pid: int, command: str, options: SessionOptions,
                  interval: float | None, option: str = "-o") -> RecordingWriter:
    meta = {"pid": pid, "command": command, "interval": interval,
            "options": codec.encode(options)}
    return RecordingWriter(path, meta, build_id_reader(pid), option)
