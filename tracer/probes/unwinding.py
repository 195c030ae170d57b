"""The unwind tables bpf/stacks.bpf.h walks with: one row list per traced address
space (the target and each child natrace follows), in runtime addresses.

Each executable file mapping contributes its object's CFI rows (tracer/symbols/cfi.py)
when the object keeps no frame pointers (`auto`) or always (`cfi`); one FP row
otherwise, and for anonymous executable memory (JIT code: V8 keeps frame pointers).
Every mapping ends with a NO_MAPPING row, so an address outside them all ends the
walk. Every process's rows are a segment of the one unwind_rows array; its slot in
unwind_conf (natrace_proc.unwind: 0 for the target, one per child) says where. A
rewrite goes to a fresh segment, then the slot points at it, so a walk never reads a
half-written table; the old segment is written again only by the same process's next
rewrite, or once a moment has passed. A forked child starts on its parent's segment
(its mappings are the same) and gets its own once they differ (exec, a new code
mapping). Each segment written gets a new generation, for the stack-id cache.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
import time
from array import array
from dataclasses import dataclass
from typing import Any

from tracer.probes import bpfprog
from tracer.symbols import cfi
from tracer.symbols.procmaps import DELETED_SUFFIX, Mapping, MapsHistory

UNWIND_MODES = ("auto", "fp", "cfi")

#: bpf/natrace.h's struct unwind_row.
_ROW = struct.Struct("<QihBB")

#: Seconds after which a segment another process let go of may be written again: far
#: longer than a walk that read its rows before the switch can take.
_RETIRE_SECONDS = 0.05

_END_NAMES = {
    "NATRACE_END_OUTERMOST": "outermost",
    "NATRACE_END_DEPTH": "depth",
    "NATRACE_END_NO_MAPPING": "no_mapping",
    "NATRACE_END_NO_ROW": "no_unwind_info",
    "NATRACE_END_UNSUPPORTED": "unsupported_rule",
    "NATRACE_END_READ": "unreadable_stack",
    "NATRACE_END_BAD_FRAME": "bad_frame",
    "NATRACE_END_DROPPED": "dropped",
}

_Segment = tuple[int, int]  # (first row, rows)
_Loaded = tuple[tuple[int, int, int, str], ...]


@dataclass(frozen=True)
class ObjectUnwind:
    """How one object's frames are walked: "cfi" rows, or "fp" (frame pointers)."""

    path: str
    how: str
    rows: int


@dataclass
class _Space:
    """One traced address space's table: its slot and the segment that slot points at."""

    slot: int
    segment: _Segment | None = None  # None: no rows (frame pointers)
    gen: int = 0
    loaded: _Loaded = ()
    low: bool = True  # its next segment goes at the low end of the free rows


class UnwindTables:
    """Keeps the unwind tables of one BPF program's maps in step with the traced
    processes' mappings: the target's (slot 0) and those of the children adopt() adds."""

    def __init__(self, bpf: Any, mode: str, owned: bool = True, pid: int = 0) -> None:
        self._bpf = bpf
        self.mode = mode
        self.owned = owned  # False: another program's table, which that one keeps
        self._c = bpfprog.constants()
        self._limit = self._c["NATRACE_UNWIND_ROWS"]  # rows of one segment at most
        self._free: list[_Segment] = [(0, self._c["NATRACE_UNWIND_TABLE"])]
        self._retired: list[tuple[_Segment, int, float]] = []  # (segment, by pid, when)
        self._users: dict[_Segment, set[int]] = {}  # the processes each segment serves
        self._slots = list(range(self._c["NATRACE_UNWIND_SLOTS"] - 1, 0, -1))  # free ones
        self._spaces: dict[int, _Space] = {pid: _Space(0)}
        self._gen = 0  # generations handed out: walks cached under another are stale
        self._rows_of: dict[tuple[str, int, int, int], bytes] = {}
        self.objects: dict[str, ObjectUnwind] = {}
        self.overflow = False  # the mappings' rows did not fit: some objects walked by fp

    def adopt(self, pid: int, parent: int) -> int | None:
        """A child `parent` forked, stopped at birth: a slot of its own, pointing at its
        parent's segment (the same mappings) until update() finds its own differ. The
        slot, for natrace_proc.unwind; None when every slot is taken (it walks its
        parent's table). A pid already here was an earlier child's, gone unseen."""
        if not self.owned:
            return None
        self.forget(pid)
        if not self._slots:
            return None
        have = self._spaces.get(parent)
        space = self._spaces[pid] = _Space(self._slots.pop())
        if have is not None:
            space.segment, space.gen, space.loaded, space.low = (
                have.segment, have.gen, have.loaded, have.low)
            if have.segment is not None:
                self._users[have.segment].add(pid)
        self._point(space)
        return space.slot

    def forget(self, pid: int) -> None:
        """A child has exited: its slot and rows go back."""
        space = self._spaces.get(pid)
        if not self.owned or space is None or space.slot == 0:
            return
        del self._spaces[pid]
        self._release(space.segment, pid)
        space.segment, space.gen = None, 0
        self._point(space)
        self._slots.append(space.slot)
        self._prune_rows()

    def update(self, maps: MapsHistory) -> bool:
        """Rewrite the table of process maps.pid for its current mappings; False when
        nothing changed (or the table is another program's, or the process is not one
        this table serves)."""
        space = self._spaces.get(maps.pid or 0)
        if not self.owned or space is None:
            return False
        current = tuple((m.start, m.end, m.offset, m.path) for m in maps.mappings
                        if _walkable(m))
        if current == space.loaded:
            return False
        self._reclaim(maps.pid or 0)
        room = min(self._limit, max((end - start for start, end in self._free), default=0))
        c = self._c
        fp_row = (c["NATRACE_CFA_FP"], 0, c["NATRACE_RBP_SAME"], 0)
        parts: list[bytes] = []
        total = 0
        for m in maps.mappings:
            if not _walkable(m):
                continue
            rows = b""
            if m.file_backed:
                rows = self._object_rows(maps, m.start, m.end, m.offset, m)
            if rows and total + len(rows) // _ROW.size + 2 * len(current) > room:
                self.overflow = True  # the table is full: frame pointers for this one
                self.objects[m.clean_path] = ObjectUnwind(m.clean_path, "fp (table full)", 0)
                rows = b""
            if not rows:
                rows = _ROW.pack(m.start, fp_row[1], fp_row[3], fp_row[0], fp_row[2])
                if m.file_backed:
                    self.objects.setdefault(m.clean_path, ObjectUnwind(m.clean_path, "fp", 0))
            rows += _ROW.pack(m.end, 0, 0, c["NATRACE_CFA_NO_MAPPING"], 0)
            parts.append(rows)
            total += len(rows) // _ROW.size
        if total > room:
            self.overflow, total, parts = True, 0, []  # not even one row per mapping fits
        self._write(space, maps.pid or 0, b"".join(parts), total)
        space.loaded = current
        self._prune_rows()
        return True

    def _object_rows(self, maps: MapsHistory, start: int, end: int, offset: int,
                     m: Mapping) -> bytes:
        """The CFI rows of mapping `m`, in runtime addresses, clipped to it; b"" when
        the object keeps frame pointers (auto) or has no CFI."""
        key = (m.clean_path, start, end, offset)
        if key in self._rows_of:
            return self._rows_of[key]
        out = b""
        path = maps.module_path(m)
        table = cfi.unwind_table(path) if path else cfi.EMPTY
        vaddr = table.vaddr_of_offset(offset)
        use = len(table) > 0 and vaddr is not None and (
            self.mode == "cfi" or not table.frame_pointers)
        if use and vaddr is not None:
            out = _clip(table, start - vaddr, start, end)
            self.objects[m.clean_path] = ObjectUnwind(m.clean_path, "cfi", len(table))
        self._rows_of[key] = out
        return out

    def _prune_rows(self) -> None:
        """Keep the rows of mappings some traced process still has: each exec'd child
        maps its libraries at addresses of its own."""
        live = {(path.removesuffix(DELETED_SUFFIX), start, end, offset)
                for space in self._spaces.values()
                for start, end, offset, path in space.loaded}
        for key in [k for k in self._rows_of if k not in live]:
            del self._rows_of[key]

    def _write(self, space: _Space, pid: int, rows: bytes, count: int) -> None:
        """Rows into a fresh segment, then the process's slot pointed at it."""
        segment = self._take(count, space.low) if count else None
        if segment is not None:
            base = segment[0]
            keys = (ctypes.c_uint32 * count).from_buffer(array("I", range(base, base + count)))
            table = self._bpf["unwind_rows"]
            values = (table.Leaf * count).from_buffer_copy(rows)
            table.items_update_batch(keys, values)
            self._users[segment] = set()
        old = space.segment
        self._gen += 1
        space.segment, space.gen, space.low = segment, self._gen, not space.low
        if segment is not None:
            self._users[segment].add(pid)
        self._point(space)
        self._release(old, pid)

    def _point(self, space: _Space) -> None:
        """The slot's unwind_conf entry: the space's segment and generation."""
        base, count = space.segment or (0, 0)
        conf = self._bpf["unwind_conf"]
        conf[ctypes.c_int(space.slot)] = conf.Leaf(base, count, space.gen)

    def _release(self, segment: _Segment | None, pid: int) -> None:
        """`pid` no longer walks `segment`: retired once no process does."""
        if segment is None:
            return
        users = self._users[segment]
        users.discard(pid)
        if not users:
            del self._users[segment]
            self._retired.append((segment, pid, time.monotonic()))

    def _reclaim(self, pid: int) -> None:
        """Retired segments free again: `pid`'s own (its walks now read its new one)
        and others' once _RETIRE_SECONDS have passed."""
        now = time.monotonic()
        keep = []
        for segment, by, when in self._retired:
            if by == pid or now - when >= _RETIRE_SECONDS:
                self._give_back(segment)
            else:
                keep.append((segment, by, when))
        self._retired = keep

    def _take(self, count: int, low: bool) -> _Segment | None:
        """`count` free rows: from the lowest free range that holds them, or (not low)
        the top of the highest. One process alternating ends always finds room for a
        segment as large as the limit, like the two halves of a table of its own."""
        fits = [i for i, (start, end) in enumerate(self._free) if end - start >= count]
        if not fits:
            return None
        i = fits[0] if low else fits[-1]
        start, end = self._free[i]
        if low:
            segment, rest = (start, count), (start + count, end)
        else:
            segment, rest = (end - count, count), (start, end - count)
        if rest[1] > rest[0]:
            self._free[i] = rest
        else:
            del self._free[i]
        return segment

    def _give_back(self, segment: _Segment) -> None:
        """A segment's rows free again, merged with the free ranges beside it."""
        start, end = segment[0], segment[0] + segment[1]
        i = bisect.bisect_left(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))

    def ends(self) -> dict[str, int]:
        """Stack captures by why their walk ended, summed over CPUs."""
        table = self._bpf["unwind_ends"]
        return {name: int(sum(table[ctypes.c_int(self._c[macro])]))
                for macro, name in _END_NAMES.items()}

    def cached(self) -> tuple[int, int]:
        """Stack captures the stack-id cache answered without a walk, and those it found
        stale (a word the kept walk used had changed: walked), summed over CPUs
        (bpf/stacks.bpf.h)."""
        table = self._bpf["stack_cache_counts"]
        return (int(sum(table[ctypes.c_int(0)])), int(sum(table[ctypes.c_int(2)])))


def _walkable(m: Mapping) -> bool:
    """Executable code a frame can be in: files and JIT memory. Not [vdso] (no frame of
    an allocation is there) nor [uprobes], whose return trampoline stands in for the
    return address of a traced allocator call: a stack taken inside one ends there."""
    return m.executable and not m.special


def end_reason(code: int) -> str:
    """The name of a natrace_stack.end value."""
    c = bpfprog.constants()
    return next((name for macro, name in _END_NAMES.items() if c[macro] == code), str(code))


def _clip(table: cfi.UnwindTable, bias: int, start: int, end: int) -> bytes:
    """The table's rows that fall in [start, end) once moved by `bias`, with the row in
    force at `start` moved to `start`, as bpf/natrace.h's 16-byte rows.

    Whole-array operations on the 32-bit words of the rows (x86-64, little-endian
    like the rows themselves), not a loop per row: node's ~370k rows in milliseconds."""
    words = array("I")
    words.frombytes(table.rows)  # 3 per row: pc, cfa_off, rbp_off | rule << 16 | rbp << 24
    pcs = words[0::3]
    lo = bisect.bisect_right(pcs, start - bias) - 1
    first, last = max(lo, 0), bisect.bisect_left(pcs, end - bias)
    out = array("I")
    if last > first:
        moved = array("Q", map(bias.__add__, pcs[first:last]))
        moved[0] = max(moved[0], start)
        halves = array("I")
        halves.frombytes(moved.tobytes())
        out.frombytes(bytes(_ROW.size * (last - first)))
        out[0::4], out[1::4] = halves[0::2], halves[1::2]
        out[2::4], out[3::4] = words[3 * first + 1:3 * last:3], words[3 * first + 2:3 * last:3]
    if lo < 0:  # code before the first row: no unwind information
        return _ROW.pack(start, 0, 0, cfi.CFA_NONE, 0) + out.tobytes()
    return out.tobytes()
