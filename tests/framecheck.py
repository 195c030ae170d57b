"""No frame outside executable code, in anything natrace wrote during the tests.

Issue 16: a stack frame is a return address in an executable file mapping (or JIT code
named by a perf map), never data — `[heap]+0x2715a0`, `[stack]+0x1edd0`,
`[unknown 0x7878787878787878]` (a string's bytes), plain anonymous memory. conftest.py
runs `Sweep.check()` after every test over every report, recording, export and
flamegraph written under pytest's temporary directory since the last check, and over
the reports the helpers parsed from natrace's stdout (`seen`).

A frame of a JSON report or a recording is checked against its module's ELF file: its
module offset (the link-time address where natrace could read the file, as the
symbolizer gives it) must fall in a PT_LOAD segment with PF_X. Text outputs (text reports,
folded stacks, SVG/HTML flamegraphs, pprof's string table) only carry labels: there a
data frame is a label such as `[heap]+0x…` or `[unknown 0x…]`.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

#: Pseudo-mappings whose addresses are code: the vDSO, JIT code a perf map names, and
#: the kernel's uprobe page (a fault's pc in its uretprobe trampoline: code, if not the
#: program's).
CODE_PSEUDO_MODULES = frozenset({"[vdso]", "[jit]", "[uprobes]"})
#: Labels of frames in data (the symbolizer's `Frame.label` of such frames).
DATA_LABEL = re.compile(r"\[unknown 0x[0-9a-f]+\]|\[(?:heap|stack|anon|vvar)"
                        r"(?::\d+)?\]\+0x[0-9a-f]+")
TEXT_SUFFIXES = (".txt", ".folded", ".svg", ".html", ".log")
PPROF_SUFFIXES = (".pb.gz", ".pprof", ".pb")
MAX_BYTES = 64 << 20

#: Reports parsed from natrace's stdout since the last check (see `seen`).
_parsed: list[tuple[str, Any]] = []


def seen(what: str, report: Any) -> Any:
    """Hand a report the test parsed from natrace's stdout to the next check; returns
    it, so a helper can `return seen("snapshot", json.loads(out))`."""
    _parsed.append((what, report))
    return report


@functools.cache
def _exec_segments(path: str) -> tuple[tuple[int, int], ...] | None:
    """(link-time address, size) of the executable PT_LOAD segments; None: no ELF."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            return tuple((seg["p_vaddr"], seg["p_memsz"]) for seg in elf.iter_segments()
                         if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1)
    except (OSError, ELFError, ValueError):
        return None


def frame_problem(frame: dict[str, Any]) -> str | None:
    """Why a frame (a report's or recording's: address, module, module_offset) is not
    in executable code, or None when it is (or its file is gone and cannot say)."""
    module, address = frame.get("module") or "", frame.get("address")
    label = frame.get("label") or f"{module or '[unknown]'}+{frame.get('module_offset', 0):#x}"
    if not module:
        return f"{label}: address {address:#x} is outside every mapping"
    if module.startswith("["):
        return None if module in CODE_PSEUDO_MODULES else f"{label}: {module} is no code"
    path = module[: -len(" (deleted)")] if module.endswith(" (deleted)") else module
    segments = _exec_segments(path)
    if segments is None:
        return None  # a file we cannot read (gone with its test, memfd): nothing to check
    offset = int(frame.get("module_offset") or 0)
    if any(start <= offset < start + size for start, size in segments):
        return None
    return f"{label}: offset {offset:#x} of {path} is outside its executable segments"


def _frames(doc: Any) -> Iterator[dict[str, Any]]:
    """Every frame-shaped dict in a JSON document (reports, diffs, agent reports)."""
    if isinstance(doc, dict):
        if "module_offset" in doc and "address" in doc and "module" in doc:
            yield doc
            return
        for value in doc.values():
            yield from _frames(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _frames(value)


def document_problems(doc: Any) -> list[str]:
    return sorted({p for f in _frames(doc) if (p := frame_problem(f)) is not None})


def text_problems(text: str) -> list[str]:
    return sorted({f"{m[0]}: a frame in data" for m in DATA_LABEL.finditer(text)})


def recording_problems(path: Path) -> list[str]:
    """Every frame of every snapshot of a recording (sites and sections alike)."""
    from tracer.errors import NatraceError
    from tracer.model.codec import encode
    from tracer.recording import Recording

    out: list[str] = []
    try:
        with Recording(str(path)) as rec:
            for info in rec.snapshots:
                out += document_problems(encode(rec.snapshot(info.duration)))
    except NatraceError:
        return []  # a file the test damaged on purpose
    return sorted(set(out))


def file_problems(path: Path) -> list[str]:
    """What is wrong with the frames of one file natrace may have written."""
    name = path.name
    try:
        if path.stat().st_size > MAX_BYTES:
            return []
        data = path.read_bytes()
    except OSError:
        return []
    if name.endswith(".natrace") and data.startswith(b"SQLite format 3\0"):
        return recording_problems(path)
    if name.endswith(".json"):
        try:
            doc = json.loads(data)
        except ValueError:
            return []
        return document_problems(doc) + text_problems(data.decode("utf-8", "replace"))
    if name.endswith(PPROF_SUFFIXES):
        try:
            data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        except (OSError, EOFError):
            return []
        return text_problems(data.decode("latin-1"))
    if name.endswith(TEXT_SUFFIXES):
        return text_problems(data.decode("utf-8", "replace"))
    return []


class Sweep:
    """Files under `root` checked once each (again when rewritten)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._checked: dict[str, tuple[int, int]] = {}

    def _new_files(self) -> Iterator[Path]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                stamp = (st.st_mtime_ns, st.st_size)
                if self._checked.get(path) != stamp and os.path.isfile(path):
                    self._checked[path] = stamp
                    yield Path(path)

    def check(self) -> list[str]:
        """Problems in what was written or parsed since the last check."""
        out = [f"{path}: {p}" for path in self._new_files() for p in file_problems(path)]
        out += [f"{what} (stdout): {p}" for what, doc in _parsed for p in document_problems(doc)]
        _parsed.clear()
        return out
