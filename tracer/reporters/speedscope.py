"""speedscope JSON (https://www.speedscope.app/file-format-schema.json): one sampled
profile whose samples are the site stacks (root first) and whose weights are the metric.
"""

from __future__ import annotations

import json
from typing import Any

from tracer import __version__
from tracer.model.frames import Frame
from tracer.model.snapshot import Snapshot
from tracer.reporters.stacks import ExportOptions, function_name, weighted_stacks

SCHEMA_URL = "https://www.speedscope.app/file-format-schema.json"
_UNITS = {"bytes": "bytes", "count": "none", "nanoseconds": "nanoseconds"}


def to_dict(snap: Snapshot, options: ExportOptions) -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    index: dict[tuple[str, str], int] = {}

    def frame_index(f: Frame) -> int:
        key = (function_name(f), f.module)
        if key not in index:
            index[key] = len(frames)
            entry: dict[str, Any] = {"name": f"{key[0]} [{f.module_name}]",
                                     "file": f.file or f.module or f.module_name}
            if f.file and f.line:
                entry["line"] = f.line
            frames.append(entry)
        return index[key]

    stacks = weighted_stacks(snap, options.metric)
    samples = [[frame_index(f) for f in s.frames] for s in stacks]
    weights = [s.value for s in stacks]
    name = options.title or f"{snap.command} (PID {snap.pid}): {options.metric.description}"
    return {
        "$schema": SCHEMA_URL,
        "shared": {"frames": frames},
        "profiles": [{"type": "sampled", "name": name, "unit": _UNITS[options.metric.unit],
                      "startValue": 0, "endValue": sum(weights), "samples": samples,
                      "weights": weights}],
        "name": name,
        "activeProfileIndex": 0,
        "exporter": f"natrace {__version__}",
    }


def render(snap: Snapshot, options: ExportOptions) -> str:
    return json.dumps(to_dict(snap, options)) + "\n"
