"""Live anonymous mappings and heap (brk) growth, as ranges charged to call sites.

mmap/munmap/mremap/mprotect/brk arrive as streamed events; a partial munmap, an
mremap or an mprotect must split, shrink or move ranges, which is why this lives in
Python and not in a BPF map.

A range is accessible or not (PROT_NONE). PROT_NONE address space holds no memory: V8's
pointer-compression cage and code range, a JVM's heap, Wasm memories and glibc's arena
heaps reserve it with mmap(PROT_NONE) and commit pieces with mprotect. So a program's
unfreed mapping bytes are its accessible bytes: a piece made accessible by mprotect is
charged to the range's owner (the reservation's stack: mprotect carries none), and a
PROT_NONE mmap with MAP_FIXED over live ranges (V8's decommit) keeps their owners, so a
piece committed again is charged where it was before. An accessible mmap is its own
owner's, MAP_FIXED or not. The allocator's own ranges count whole, accessible or not:
they are left out of the program's totals, and the memory report compares them with the
arenas' reserved address space.
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
    accessible: bool = True

    def counted(self) -> bool:
        """Does it hold memory (see the module's note)?"""
        return self.accessible or self.owner.allocator_internal


class MappingTracker:
    """Non-overlapping live ranges, sorted by start."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ranges: list[_Range] = []
        self._brk: int | None = None
        #: each owner's accessible mmaps and brk growths while traced, [calls, bytes]:
        #: its "allocated while traced", unmapped since or not
        self._made: dict[Owner, list[int]] = {}

    def _count_made(self, owner: Owner, length: int) -> None:
        made = self._made.setdefault(owner, [0, 0])
        made[0] += 1
        made[1] += length

    def mmap(self, addr: int, length: int, owner: Owner, accessible: bool = True,
             fixed: bool = False) -> None:
        end = addr + _page_up(length)
        if fixed and not accessible:
            self._protect(addr, end, False, owner)  # a decommit: owners kept
            return
        self._remove(addr, end)  # MAP_FIXED replaces whatever was there
        self._insert(_Range(addr, end, owner, accessible))
        if accessible or owner.allocator_internal:  # as counted() holds it
            self._count_made(owner, end - addr)

    def mprotect(self, addr: int, length: int, accessible: bool) -> None:
        """Live ranges in [addr, addr+length) made accessible or PROT_NONE; address
        space natrace did not see mapped (file-backed, or mapped before attach) stays
        unknown."""
        self._protect(addr, addr + _page_up(length), accessible, None)

    def munmap(self, addr: int, length: int) -> None:
        self._remove(addr, addr + _page_up(length))

    def mremap(self, old: int, old_len: int, new: int, new_len: int) -> None:
        old_end = old + _page_up(old_len)
        moved = self._overlapping(old, old_end)
        if not moved:
            return  # a mapping made before attach, or file-backed
        first = moved[0]  # the kernel moves one mapping: one protection
        self._remove(old, old_end)
        new_end = new + _page_up(new_len)
        self._remove(new, new_end)
        self._insert(_Range(new, new_end, first.owner, first.accessible))

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
            self._count_made(owner, new_break - old)
            i = bisect.bisect_left(self._starts, old)
            below = self._ranges[i - 1] if i else None
            if below is not None and below.end == old and below.owner == owner \
                    and below.accessible:
                below.end = new_break
            else:
                self._insert(_Range(old, new_break, owner))
        else:
            self._remove(new_break, old)

    def set_initial_break(self, brk: int) -> None:
        if self._brk is None:
            self._brk = brk

    def totals(self) -> Iterator[tuple[Owner, int, int, int, int]]:
        """(owner, live bytes, ranges, mappings made, bytes made) for each owner with
        live ranges that hold memory (PROT_NONE pieces of the program's are left out:
        see reserved()) or that mapped any while traced (accessible mmaps and brk
        growths, as allocations are counted; a PROT_NONE reservation committed later by
        mprotect counts none)."""
        acc: dict[Owner, list[int]] = {}
        for r in self._ranges:
            if not r.counted():
                continue
            slot = acc.setdefault(r.owner, [0, 0])
            slot[0] += r.end - r.start
            slot[1] += 1
        for owner in self._made.keys() - acc.keys():
            acc[owner] = [0, 0]
        for owner, (size, count) in acc.items():
            calls, made = self._made.get(owner, (0, 0))
            yield owner, size, count, calls, made

    def reserved(self) -> tuple[int, int]:
        """(bytes, ranges) of the program's PROT_NONE address space: not counted."""
        pieces = [r.end - r.start for r in self._ranges if not r.counted()]
        return sum(pieces), len(pieces)

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

    def _protect(self, start: int, end: int, accessible: bool, gaps: Owner | None) -> None:
        """Set the protection of [start, end) where live ranges are (splitting those at
        its ends); with `gaps`, the space between them becomes ranges of that owner.
        Neighbours of one owner and protection are joined again, as the kernel merges
        them: a reservation committed piece by piece stays a few ranges."""
        lo, hi = self._span(start, end)
        if lo == hi and gaps is None:
            return  # nothing natrace saw mapped there
        out: list[_Range] = []
        at = start
        for r in self._ranges[lo:hi]:
            if r.start > at and gaps is not None:
                out.append(_Range(at, r.start, gaps, accessible))
            if r.start < start:
                out.append(_Range(r.start, start, r.owner, r.accessible))
            out.append(_Range(max(r.start, start), min(r.end, end), r.owner, accessible))
            if r.end > end:
                out.append(_Range(end, r.end, r.owner, r.accessible))
            at = r.end
        if at < end and gaps is not None:
            out.append(_Range(at, end, gaps, accessible))
        if lo > 0:
            lo -= 1
            out.insert(0, self._ranges[lo])
        if hi < len(self._ranges):
            out.append(self._ranges[hi])
            hi += 1
        joined: list[_Range] = []
        for r in out:
            last = joined[-1] if joined else None
            if last is not None and last.end == r.start and last.owner == r.owner \
                    and last.accessible == r.accessible:
                last.end = r.end
            else:
                joined.append(r)
        self._ranges[lo:hi] = joined
        self._starts[lo:hi] = [r.start for r in joined]

    def _insert(self, r: _Range) -> None:
        i = bisect.bisect_left(self._starts, r.start)
        self._starts.insert(i, r.start)
        self._ranges.insert(i, r)

    def _remove(self, start: int, end: int) -> None:
        lo, hi = self._span(start, end)
        if lo >= hi:
            return
        first, last = self._ranges[lo], self._ranges[hi - 1]
        kept = ([_Range(first.start, start, first.owner, first.accessible)]
                if first.start < start else []) + \
            ([_Range(end, last.end, last.owner, last.accessible)] if last.end > end else [])
        self._ranges[lo:hi] = kept
        self._starts[lo:hi] = [r.start for r in kept]
