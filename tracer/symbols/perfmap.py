"""Names of JIT-compiled code from /tmp/perf-PID.map.

V8 puts JavaScript code in anonymous memory that no ELF file describes; with
`node --perf-basic-prof` it appends one line per code object, `START SIZE name` (hex,
no 0x). The file grows while the process runs, so it is read incrementally, and code
objects get moved or replaced, so a later line for an address wins over an earlier one.
"""

from __future__ import annotations

import bisect
import os


def perf_map_path(pid: int, proc: str = "/proc") -> str:
    """Where the process's perf map is, as seen from here.

    A process in a container writes /tmp/perf-<its own pid>.map inside its own root.
    """
    nspid = pid
    try:
        with open(f"{proc}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    nspid = int(line.split()[-1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    inside = f"{proc}/{pid}/root/tmp/perf-{nspid}.map"
    if nspid != pid and os.path.exists(inside):
        return inside
    return f"/tmp/perf-{pid}.map"


def parse_line(line: str) -> tuple[int, int, str] | None:
    """(start, size, name) of one perf-map line; None for garbage (never raises)."""
    parts = line.strip().split(None, 2)
    if len(parts) < 3:
        return None
    try:
        start, size = int(parts[0], 16), int(parts[1], 16)
    except ValueError:
        return None
    if start < 0 or size <= 0 or start >= 1 << 64:
        return None
    return start, size, parts[2]


class PerfMap:
    """Incrementally read perf map; `lookup(addr)` -> (name, offset)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._pos = 0
        self._pending = b""
        self._seq = 0
        self._by_start: dict[int, tuple[int, int, str]] = {}  # start -> (size, seq, name)
        self._starts: list[int] = []
        self._dirty = False
        self.refresh()

    def __len__(self) -> int:
        return len(self._by_start)

    def refresh(self) -> bool:
        """Read what was appended since last time; True when new entries arrived.

        A file that shrank was rewritten: start over. A missing file keeps what we have.
        """
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self._pos:
                    self._pos, self._pending = 0, b""
                    self._by_start.clear()
                    self._dirty = True
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return False
        if not data:
            return False
        self._pos += len(data)
        data = self._pending + data
        cut = data.rfind(b"\n")
        # Keep an unfinished last line for next time: the writer may be mid-line.
        self._pending = data[cut + 1:]
        if cut < 0:
            return False
        added = False
        for raw in data[:cut].split(b"\n"):
            entry = parse_line(raw.decode("utf-8", "replace"))
            if entry is None:
                continue
            start, size, name = entry
            self._seq += 1
            self._by_start[start] = (size, self._seq, name)
            added = True
        if added:
            self._dirty = True
        return added

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(name, offset) of the newest code object covering `addr`, or None."""
        if self._dirty:
            self._starts = sorted(self._by_start)
            self._dirty = False
        i = bisect.bisect_right(self._starts, addr) - 1
        best: tuple[int, str, int] | None = None
        # Code objects may overlap when one replaced another: look back a few entries.
        for j in range(i, max(-1, i - 8), -1):
            start = self._starts[j]
            size, seq, name = self._by_start[start]
            if start <= addr < start + size and (best is None or seq > best[0]):
                best = (seq, name, addr - start)
        return (best[1], best[2]) if best else None
