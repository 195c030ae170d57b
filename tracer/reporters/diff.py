"""`natrace diff`: growth per module and per site between two snapshots, as text or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

from tracer.model.diff import Growth, SnapshotDiff
from tracer.model.snapshot import Snapshot


def _signed(n: int) -> str:
    return f"{n:+,}"


def _when(label: str, snap: Snapshot) -> str:
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken_at))
    return f"{label} PID {snap.pid} at {at} ({snap.duration:.1f} s traced)"


def render(d: SnapshotDiff, before: str, after: str, top: int = 10) -> str:
    lines = [f"natrace diff: {_when(before, d.before)}", f"          -> {_when(after, d.after)}",
             f"Unfreed: {d.before.total_bytes():,} -> {d.after.total_bytes():,} bytes "
             f"({_signed(d.bytes)}), {d.before.total_blocks():,} -> "
             f"{d.after.total_blocks():,} blocks ({_signed(d.blocks)})", "",
             "Growth by module:",
             f"  {'GROWTH':>14} {'BLOCKS':>9} {'BEFORE':>14} {'AFTER':>14}  MODULE"]
    lines += [_line(g, g.name) for g in d.modules]
    shown = d.sites[:top]
    lines += ["", f"Top {len(shown)} call sites by growth:",
              f"  {'GROWTH':>14} {'BLOCKS':>9} {'BEFORE':>14} {'AFTER':>14}  "
              f"{'KIND':6} {'MODULE':16} CALL SITE"]
    lines += [_line(g, f"{g.kind:6} {g.module_class[:16]:16} {g.name}") for g in shown]
    if not d.sites:
        lines.append("  (no site changed)")
    return "\n".join(lines) + "\n"


def _line(g: Growth, what: str) -> str:
    return (f"  {_signed(g.bytes):>14} {_signed(g.blocks):>9} {g.before_bytes:>14,} "
            f"{g.after_bytes:>14,}  {what}")


def to_dict(d: SnapshotDiff, before: str, after: str) -> dict[str, Any]:
    def row(g: Growth) -> dict[str, Any]:
        return {"name": g.name, "module_class": g.module_class, "kind": g.kind,
                "bytes": g.bytes, "blocks": g.blocks, "before_bytes": g.before_bytes,
                "after_bytes": g.after_bytes, "before_blocks": g.before_blocks,
                "after_blocks": g.after_blocks}

    return {"format": "natrace-diff", "version": 1, "before": before, "after": after,
            "bytes": d.bytes, "blocks": d.blocks,
            "modules": [row(g) for g in d.modules], "sites": [row(g) for g in d.sites]}


def render_json(d: SnapshotDiff, before: str, after: str) -> str:
    return json.dumps(to_dict(d, before, after), indent=2) + "\n"
