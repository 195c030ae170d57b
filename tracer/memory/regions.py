"""The process's regions from /proc/PID/smaps: what backs each one, the largest ones,
how close it is to vm.max_map_count, and glibc's per-thread malloc arenas.

A process leaking mappings can have tens of thousands of regions, so smaps is read
in one piece and scanned with one regular expression (no per-line Python loop).

glibc gives each arena beyond the main one heaps of HEAP_MAX_SIZE (64 MiB on 64-bit):
a reservation aligned to 64 MiB whose front is read-write and whose rest is PROT_NONE.
A candidate found from that shape is confirmed by reading the heap's header
(heap_info: ar_ptr, prev, size, mprotect_size) from /proc/PID/mem; `ar_ptr` also tells
which arena each heap serves, so arenas and heaps are counted apart.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import time
from collections.abc import Iterable, Sequence

from tracer.model.memory import (
    ArenaHeap,
    ArenaSummary,
    BackingTotal,
    Region,
    RegionSummary,
)

HEAP_MAX_SIZE = 64 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
TOP_REGIONS = 5
DOMINATES = 0.5  # arenas "dominate" VMS or RSS above this share

# The header line of a region, then its Rss line: the fields before Rss (Size,
# KernelPageSize, MMUPageSize) hold no "R", which lets the scan skip them in one step.
_SMAPS = re.compile(
    rb"\n([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+) *([^\n]*)\n[^R]*Rss: +(\d+) kB")
_KERNEL = ("[vdso]", "[vvar]", "[vsyscall]", "[vvar_vclock]", "[uprobes]")


def read_smaps(pid: int) -> list[Region]:
    """Every region of the process, in address order, each with its backing."""
    with open(f"/proc/{pid}/smaps", "rb") as fh:
        data = fh.read()
    return parse_smaps(data, thread_stack_pointers(pid))


def parse_smaps(data: bytes, stack_pointers: Sequence[int] = ()) -> list[Region]:
    sps = sorted(stack_pointers)
    out = []
    for m in _SMAPS.finditer(b"\n" + data):
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        path = m.group(5).decode(errors="replace").rstrip()
        backing = _backing(path, int(m.group(4)))
        if backing == "anonymous" and _holds_any(sps, start, end):
            backing = "stack"
        out.append(Region(start, end, m.group(3).decode(), backing, path,
                          int(m.group(6)) * 1024))
    return out


def _backing(path: str, inode: int) -> str:
    if inode:
        return "file"
    if not path:
        return "anonymous"
    if path == "[heap]":
        return "heap"
    if path.startswith("[stack"):
        return "stack"
    if path.startswith("[anon:"):
        return path[1:-1]
    if path in _KERNEL:
        return "kernel"
    return "file"  # memfd, /dev/zero, SysV shared memory: no inode shown but a name


def _holds_any(sorted_points: Sequence[int], start: int, end: int) -> bool:
    i = bisect.bisect_left(sorted_points, start)
    return i < len(sorted_points) and sorted_points[i] < end


def thread_stack_pointers(pid: int) -> list[int]:
    """Stack pointers of the threads blocked in a system call (/proc/PID/task/*/syscall):
    the anonymous regions holding them are thread stacks the kernel does not name."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as fh:
                fields = fh.read().split()
        except OSError:
            continue
        if len(fields) >= 9 and fields[0] != "running":
            out.append(int(fields[-2], 16))
    return out


def max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def summarize(regions: Sequence[Region], top: int = TOP_REGIONS) -> RegionSummary:
    totals: dict[str, list[int]] = {}
    for r in regions:
        t = totals.setdefault(r.backing, [0, 0, 0])
        t[0] += 1
        t[1] += r.size
        t[2] += r.rss
    by_backing = sorted((BackingTotal(b, n, s, rss) for b, (n, s, rss) in totals.items()),
                        key=lambda t: (-t.rss, -t.size, t.backing))
    return RegionSummary(
        at=time.time(),
        regions=len(regions),
        writable=sum(1 for r in regions if r.writable),
        max_map_count=max_map_count(),
        by_backing=by_backing,
        largest_by_size=sorted(regions, key=lambda r: (-r.size, r.start))[:top],
        largest_by_rss=sorted(regions, key=lambda r: (-r.rss, r.start))[:top],
    )


def find_arenas(pid: int, regions: list[Region]) -> ArenaSummary:
    """Detect glibc arena heaps among `regions` and relabel their regions "arena"."""
    heaps: list[ArenaHeap] = []
    claimed: set[int] = set()
    headers = _HeaderReader(pid)
    try:
        for i, r in enumerate(regions):
            if not _anon_private(r) or r.perms[:3] != "rw-":
                continue
            first = -(-r.start // HEAP_MAX_SIZE) * HEAP_MAX_SIZE
            for base in range(first, r.end, HEAP_MAX_SIZE):
                heap, used = _heap_at(regions, i, base, headers)
                if heap is not None:
                    heaps.append(heap)
                    claimed.update(used)
    finally:
        headers.close()
    verified = bool(heaps) and headers.readable
    for i in claimed:
        r = regions[i]
        regions[i] = Region(r.start, r.end, r.perms, "arena", r.path, r.rss)
    arenas = len({h.arena for h in heaps}) if verified else len(heaps)
    return ArenaSummary(heaps=heaps, arenas=arenas, verified=verified)


def _anon_private(r: Region) -> bool:
    return r.backing in ("anonymous", "arena") and r.perms[3] == "p"


def _heap_at(regions: list[Region], i: int, base: int,
             headers: _HeaderReader) -> tuple[ArenaHeap | None, list[int]]:
    """The heap whose reservation starts at `base` (inside regions[i]), if that is one."""
    limit = base + HEAP_MAX_SIZE
    pos, rw_end, rss, used = base, base, 0, []
    j = i
    for perms in ("rw-", "---"):
        while pos < limit and j < len(regions):
            r = regions[j]
            if r.start > pos or r.perms[:3] != perms or not _anon_private(r):
                break
            part = min(r.end, limit) - pos
            rss += r.rss * part // r.size if r.rss else 0
            used.append(j)
            pos += part
            if r.end > limit:
                break
            j += 1
        if perms == "rw-":
            rw_end = pos
    if pos != limit or rw_end == base:
        return None, []
    header = headers.read(base)
    if headers.readable:
        if header is None:
            return None, []
        ar_ptr, prev, size, mprotect_size = header
        if (mprotect_size != rw_end - base or not 0 < size <= mprotect_size or not ar_ptr
                or prev % HEAP_MAX_SIZE):
            return None, []
        return ArenaHeap(base, HEAP_MAX_SIZE, rw_end - base, rss, ar_ptr), used
    if regions[i].start != base:  # unverifiable: only trust a reservation's own start
        return None, []
    return ArenaHeap(base, HEAP_MAX_SIZE, rw_end - base, rss), used


class _HeaderReader:
    """Reads heap_info headers from /proc/PID/mem (needs ptrace access, as root has)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.readable = True
        self._fd: int | None = None

    def read(self, addr: int) -> tuple[int, int, int, int] | None:
        if self._fd is None and self.readable:
            try:
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
            except OSError:
                self.readable = False
        if self._fd is None:
            return None
        try:
            data = os.pread(self._fd, 32, addr)
        except OSError:
            return None
        if len(data) != 32:
            return None
        return struct.unpack("<4Q", data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def dominance(arenas: ArenaSummary, vms: int, rss: int) -> list[str]:
    """Which of VMS and RSS arenas make up most of (ignoring less than one heap's worth:
    a small process is not worth retuning)."""
    out = []
    if arenas.reserved >= HEAP_MAX_SIZE and arenas.reserved > DOMINATES * vms:
        out.append("VMS")
    if arenas.rss >= HEAP_MAX_SIZE and arenas.rss > DOMINATES * rss:
        out.append("RSS")
    return out


def rss_by_backing(regions: Iterable[Region]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in regions:
        out[r.backing] = out.get(r.backing, 0) + r.rss
    return out
