"""The unwind table bpf/stacks.bpf.h walks with: one row list over the target's
executable mappings, in runtime addresses.

Each executable file mapping contributes its object's CFI rows (tracer/symbols/cfi.py)
when the object keeps no frame pointers (`auto`) or always (`cfi`); one FP row
otherwise, and for anonymous executable memory (JIT code: V8 keeps frame pointers).
Every mapping ends with a NO_MAPPING row, so an address outside them all ends the
walk. The table has two halves: the idle one is written, then unwind_conf points
the BPF walk at it, so a walk never reads a half-written table.
"""

from __future__ import annotations

import bisect
import ctypes
import struct
from array import array
from dataclasses import dataclass
from typing import Any

from tracer.probes import bpfprog
from tracer.symbols import cfi
from tracer.symbols.procmaps import Mapping, MapsHistory

UNWIND_MODES = ("auto", "fp", "cfi")

#: bpf/natrace.h's struct unwind_row.
_ROW = struct.Struct("<QihBB")

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


@dataclass(frozen=True)
class ObjectUnwind:
    """How one object's frames are walked: "cfi" rows, or "fp" (frame pointers)."""

    path: str
    how: str
    rows: int


class UnwindTables:
    """Keeps one BPF program's unwind table in step with the target's mappings."""

    def __init__(self, bpf: Any, mode: str, owned: bool = True) -> None:
        self._bpf = bpf
        self.mode = mode
        self.owned = owned  # False: another program's table, which that one keeps
        self._c = bpfprog.constants()
        self._half = self._c["NATRACE_UNWIND_ROWS"]
        self._base = self._half  # the first update writes half 0
        self._gen = 0  # unwind_conf's generation: walks cached under an older one are stale
        self._loaded: tuple[tuple[int, int, int, str], ...] = ()
        self._rows_of: dict[tuple[str, int, int, int], bytes] = {}
        self.objects: dict[str, ObjectUnwind] = {}
        self.overflow = False  # the mappings' rows did not fit: some objects walked by fp

    def update(self, maps: MapsHistory) -> bool:
        """Rewrite the table for the current mappings; False when nothing changed (or the
        table is another program's)."""
        if not self.owned:
            return False
        current = tuple((m.start, m.end, m.offset, m.path) for m in maps.mappings
                        if _walkable(m))
        if current == self._loaded:
            return False
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
            if rows and total + len(rows) // _ROW.size + 2 * len(current) > self._half:
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
        self._write(b"".join(parts), total)
        self._loaded = current
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

    def _write(self, rows: bytes, count: int) -> None:
        base = 0 if self._base else self._half
        if count:
            keys = (ctypes.c_uint32 * count).from_buffer(array("I", range(base, base + count)))
            table = self._bpf["unwind_rows"]
            values = (table.Leaf * count).from_buffer_copy(rows)
            table.items_update_batch(keys, values)
        conf = self._bpf["unwind_conf"]
        self._gen += 1
        conf[ctypes.c_int(0)] = conf.Leaf(base, count, self._gen)
        self._base = base

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
