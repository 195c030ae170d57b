"""Live anonymous mappings and heap (brk) growth, as ranges charged to call sites.

mmap/munmap/mremap/brk arrive as streamed events; a partial munmap or an mremap
must split, shrink or move ranges, which is why this lives in Python and not in
a BPF map.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

PAGE = 4096


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Owner:
    """Who made a range: the stack (addresses, frame 0 first), how, and whether the
    allocator made it for itself (its bytes are already counted as malloc blocks)."""

    stack: tuple[int, ...]
    kind: str  # "mmap" or "brk"
    allocator_internal: bool


@dataclass(slots=True)  # slots: one per live mapping and heap piece, for the whole trace
class _Range:
    start: int
    end: int
    owner: Owner


class MappingTracker:
    """Non-overlapping live ranges, sorted by start."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[_Range] = []
        self._brk: int | None = None

    def mmap(self, addr: int, length: int, owner: Owner) -> None:
        end = addr + _page_up(length)
        self._remove(addr, end)  # MAP_FIXED replaces whatever was there
        self._insert(_Range(addr, end, owner))

    def munmap(self, addr: int, length: int) -> None:
        self._remove(addr, addr + _page_up(length))

    def mremap(self, old: int, old_len: int, new: int, new_len: int) -> None:
        old_end = old + _page_up(old_len)
        owners = [r.owner for r in self._overlapping(old, old_end)]
        if not owners:
            return  # a mapping made before attach, or file-backed
        self._remove(old, old_end)
        new_end = new + _page_up(new_len)
        self._remove(new, new_end)
        self._insert(_Range(new, new_end, owners[0]))

    def brk(self, new_break: int, owner: Owner) -> None:
        """A new program break: growth is charged to `owner`, shrinking releases the top.
        Growth right above a range of the same owner extends it: a heap that grows
        by thousands of sbrk calls (a leaking process) is a few ranges, not one
        object per call, so natrace's memory stays flat while the target's grows."""
        old = self._brk
        self._brk = new_break
        if old is None or new_break == old:
            return
        if new_break > old:
            i = bisect.bisect_left(self._starts, old)
            below = self._ranges[i - 1] if i else None
            if below is not None and below.end == old and below.owner == owner:
                below.end = new_break
            else:
                self._insert(_Range(old, new_break, owner))
        else:
            self._remove(new_break, old)

    def set_initial_break(self, brk: int) -> None:
        if self._brk is None:
            self._brk = brk

    def totals(self) -> Iterator[tuple[Owner, int, int]]:
        """(owner, live bytes, ranges) for each owner with live ranges."""
        acc: dict[Owner, list[int]] = {}
        for r in self._ranges:
            slot = acc.setdefault(r.owner, [0, 0])
            slot[0] += r.end - r.start
            slot[1] += 1
        for owner, (size, count) in acc.items():
            yield owner, size, count

    def ranges(self) -> Iterator[tuple[int, int, Owner]]:
        """(start, end, owner) of every live range, by address."""
        for r in self._ranges:
            yield r.start, r.end, r.owner

    def _overlapping(self, start: int, end: int) -> list[_Range]:
        lo, hi = self._span(start, end)
        return self._ranges[lo:hi]

    def _span(self, start: int, end: int) -> tuple[int, int]:
        """Indices [lo, hi) of the ranges overlapping [start, end): contiguous, as the
        ranges are sorted and never overlap. Logarithmic: node's heap moves its break
        thousands of times a second."""
        lo = max(bisect.bisect_right(self._starts, start) - 1, 0)
        if lo < len(self._ranges) and self._ranges[lo].end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end, lo)
        return lo, hi

    def _insert(self, r: _Range) -> None:
        i = bisect.bisect_left(self._starts, r.start)
        self._starts.insert(i, r.start)
        self._ranges.insert(i, r)

    def _remove(self, start: int, end: int) -> None:
        lo, hi = self._span(start, end)
        if lo >= hi:
            return
        first, last = self._ranges[lo], self._ranges[hi - 1]
        kept = ([_Range(first.start, start, first.owner)] if first.start < start else []) + \
            ([_Range(end, last.end, last.owner)] if last.end > end else [])
        self._ranges[lo:hi] = kept
        self._starts[lo:hi] = [r.start for r in kept]
