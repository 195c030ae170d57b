"""Folded stacks (`flamegraph.pl`, inferno, speedscope import): one line per stack.

`root;caller;...;leaf VALUE`, root first, value last; each frame is `function [module]`.
Semicolons and line breaks inside names would split frames or lines, so they become
':' and ' '. Identical stacks are merged into one line.
"""

from __future__ import annotations

from tracer.model.frames import Frame
from tracer.model.snapshot import Snapshot
from tracer.reporters.stacks import ExportOptions, function_name, weighted_stacks


def frame_text(frame: Frame) -> str:
    text = f"{function_name(frame)} [{frame.module_name}]"
    return text.replace(";", ":").replace("\n", " ").replace("\r", " ")


def render(snap: Snapshot, options: ExportOptions) -> str:
    lines: dict[str, int] = {}
    for stack in weighted_stacks(snap, options.metric):
        key = ";".join(frame_text(f) for f in stack.frames)
        lines[key] = lines.get(key, 0) + stack.value
    return "".join(f"{stack} {value}\n" for stack, value in lines.items())
