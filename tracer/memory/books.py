"""glibc malloc's own books, read from outside through /proc/PID/mem.

No injection and no stopping: the arenas (main_arena and its `next` list), each
arena's system memory, top chunk, fastbins, unsorted, small and large bins, and the
tcaches found at the start of each heap are read while the process runs. The struct
layouts and the addresses of main_arena and mp_ come from libc's debug info
(libc6-dbg, by build-id) through pyelftools' DWARF, derived once per build-id and
cached.

Every pointer followed must lie in one of the arena's heaps, be aligned, and agree
with its neighbours (a free chunk's size matches its bin, the next chunk's prev_size
and PREV_INUSE, fd/bk point back). An arena whose walk fails a check, whose lock was
held, or whose malloc_state changed during the walk is read again, a bounded number
of times, then reported as torn: its figures are never used.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from elftools.elf.elffile import ELFFile

from tracer.files import write_private
from tracer.memory.regions import find_arenas, read_smaps
from tracer.model.books import AllocatorBooks, ArenaBooks, TcacheBooks
from tracer.model.memory import ArenaHeap, Region
from tracer.symbols.elfsyms import ElfSymbols, default_cache_dir, read_build_id

LAYOUT_VERSION = 1
SIZE_SZ = 8
ALIGN = 16
MINSIZE = 32
PREV_INUSE, IS_MMAPPED, SIZE_BITS = 1, 2, 7
PAGE = os.sysconf("SC_PAGE_SIZE")
ATTEMPTS = 20  # reads of one arena before it is reported torn
ARENA_BUDGET = 2.0  # seconds of attempts on one arena before it is reported torn
REGION_ROUNDS = 2  # fresh reads of the regions when arenas stay torn
BUSY_WAIT = 0.002  # seconds between attempts
MAX_CHUNKS = 500_000  # free chunks walked per arena, all lists together (~5 s)
MAX_ARENAS = 1024

_PRESENT = bytes(i >> 7 for i in range(256))  # a pagemap entry's last byte -> present bit
_LIBC = re.compile(r"(^|/)libc(\.so\.6|-2\.\d+\.so)$")
_OTHER_ALLOCATOR = re.compile(r"(^|/)lib(jemalloc|tcmalloc|tcmalloc_minimal|mimalloc)[^/]*\.so")
# struct -> members every reading needs
_NEEDED = {
    "malloc_state": ("mutex", "fastbinsY", "top", "bins", "next", "system_mem"),
    "malloc_par": ("trim_threshold", "arena_max", "n_mmaps", "mmapped_mem", "sbrk_base",
                   "tcache_bins", "tcache_count"),
    "_heap_info": ("ar_ptr", "prev", "size"),
    "tcache_perthread_struct": ("counts", "entries"),
    "tcache_entry": ("next", "key"),
}
_VARIABLES = ("main_arena", "mp_")


class Torn(Exception):
    """The memory changed under the read (or a check failed): read again."""


class TooMany(Torn):
    """More free chunks than a walk may follow: reading again would not help."""


@dataclass(frozen=True)
class Layout:
    """What the reader needs from libc's DWARF: struct sizes, member offsets and array
    lengths, and link-time addresses of main_arena and mp_."""

    build_id: str
    sizes: dict[str, int]
    members: dict[str, dict[str, list[int]]]  # struct -> member -> [offset, elem size, count]
    addresses: dict[str, int]

    def off(self, struct_name: str, member: str) -> int:
        return self.members[struct_name][member][0]

    def count(self, struct_name: str, member: str) -> int:
        return self.members[struct_name][member][2]

    def elem(self, struct_name: str, member: str) -> int:
        return self.members[struct_name][member][1]


_LAYOUT_TIMEOUT = 300.0  # seconds for the child that reads the DWARF


class NoLayout(Exception):
    """libc's layout cannot be had (no debug info, or DWARF we do not understand)."""


# -- layout from DWARF ------------------------------------------------------------------


# (device, inode, mtime, debug dirs, cache dir) -> the layout, or why there is none: an
# ELF symbol index of libc costs ~0.4 s, and a memory watch asks again every refresh
# (natrace agent: for every process it watches)
_LAYOUTS: dict[tuple[Any, ...], Layout | NoLayout] = {}


def layout_for(libc: str, debug_dirs: Sequence[str] | None = None,
               cache_dir: str | None = None) -> Layout:
    """The layout of the libc at `libc` (a path we can open); raises NoLayout."""
    try:
        st = os.stat(libc)
    except OSError:
        return _layout_for(libc, debug_dirs, cache_dir)  # as it always did, uncached
    key = (st.st_dev, st.st_ino, st.st_mtime_ns,
           None if debug_dirs is None else tuple(debug_dirs), cache_dir)
    if key not in _LAYOUTS:
        try:
            _LAYOUTS[key] = _layout_for(libc, debug_dirs, cache_dir)
        except NoLayout as err:
            _LAYOUTS[key] = err
    found = _LAYOUTS[key]
    if isinstance(found, NoLayout):
        raise NoLayout(str(found))
    return found


def _layout_for(libc: str, debug_dirs: Sequence[str] | None,
                cache_dir: str | None) -> Layout:
    build_id = read_build_id(libc)  # not ElfSymbols: its uncached index cost ~50 ms a report
    if build_id is None:
        raise NoLayout(f"{libc} has no build-id: its malloc books cannot be matched "
                       f"to debug info")
    cache = cache_dir if cache_dir is not None else os.path.join(default_cache_dir(), "books")
    cached = os.path.join(cache, f"{build_id}.json") if cache else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as fh:
                data = json.load(fh)
            if data.get("v") == LAYOUT_VERSION:
                return Layout(build_id, data["sizes"], data["members"], data["addresses"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    syms = ElfSymbols(libc, debug_dirs=debug_dirs, cache_dir="")
    debug = syms.debug_file if syms.source != "symtab" else libc
    if debug is None:
        dirs = ", ".join(syms.debug_dirs)
        raise NoLayout(f"no debug info for {os.path.basename(libc)} (build-id {build_id}) "
                       f"under {dirs}: install libc6-dbg to read glibc's malloc books")
    layout = _layout_from_dwarf(debug, build_id)
    if cached:
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            write_private(cached, json.dumps({"v": LAYOUT_VERSION, **asdict(layout)}))
        except OSError:
            pass
    return layout


def _layout_from_dwarf(path: str, build_id: str) -> Layout:
    """The layout read by `python -m tracer.memory.books`: pyelftools holds ~60 MiB
    while it walks libc6-dbg's DWARF (once per build-id, then cached), which natrace's
    own peak memory must not carry. Its own session, so a Ctrl-C meant for natrace
    does not end it half-way."""
    try:
        proc = subprocess.run([sys.executable, "-m", "tracer.memory.books", path, build_id],
                              capture_output=True, text=True, timeout=_LAYOUT_TIMEOUT,
                              start_new_session=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise NoLayout(f"cannot read malloc's layout from {path}: {type(e).__name__}") from e
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise NoLayout(lines[-1] if lines else f"cannot read malloc's layout from {path}")
    try:
        return Layout(**json.loads(proc.stdout))
    except (ValueError, TypeError) as e:
        raise NoLayout(f"cannot read malloc's layout from {path}: {type(e).__name__}") from e


def _layout_in_process(path: str, build_id: str) -> Layout:
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            if not elf.has_dwarf_info():
                raise NoLayout(f"{path} has no DWARF: cannot read glibc's malloc books")
            dwarf = elf.get_dwarf_info()
            for cu in dwarf.iter_CUs():
                name = cu.get_top_DIE().attributes.get("DW_AT_name")
                if name is not None and re.search(rb"(^|/)malloc\.c$", name.value):
                    return _layout_from_cu(cu, build_id)
    except NoLayout:
        raise
    except Exception as e:  # hostile or unexpected DWARF: say so in one line
        raise NoLayout(f"cannot read malloc's layout from {path}: {type(e).__name__}") from e
    raise NoLayout(f"{path} has no malloc.c compile unit: cannot read glibc's malloc books")


def _layout_from_cu(cu: Any, build_id: str) -> Layout:
    sizes: dict[str, int] = {}
    members: dict[str, dict[str, list[int]]] = {}
    addresses: dict[str, int] = {}
    for die in cu.iter_DIEs():
        name_attr = die.attributes.get("DW_AT_name")
        if name_attr is None:
            continue
        name = name_attr.value.decode()
        if (die.tag == "DW_TAG_structure_type" and name in _NEEDED and name not in sizes
                and "DW_AT_byte_size" in die.attributes):
            sizes[name] = die.attributes["DW_AT_byte_size"].value
            members[name] = {
                c.attributes["DW_AT_name"].value.decode(): [
                    c.attributes["DW_AT_data_member_location"].value, *_shape(c)]
                for c in die.iter_children()
                if c.tag == "DW_TAG_member" and "DW_AT_name" in c.attributes
                and "DW_AT_data_member_location" in c.attributes}
        elif die.tag == "DW_TAG_variable" and name in _VARIABLES:
            loc = die.attributes.get("DW_AT_location")
            if loc is not None and isinstance(loc.value, list) and len(loc.value) == 9 \
                    and loc.value[0] == 0x03:  # DW_OP_addr
                addresses[name] = int.from_bytes(bytes(loc.value[1:]), "little")
    for s, needed in _NEEDED.items():
        missing = [m for m in needed if m not in members.get(s, {})]
        if missing:
            raise NoLayout(f"glibc's {s} has no {', '.join(missing)} in its debug info: "
                           f"this glibc's malloc books cannot be read")
    for v in _VARIABLES:
        if v not in addresses:
            raise NoLayout(f"glibc's debug info does not place {v}: malloc books unreadable")
    return Layout(build_id, sizes, members, addresses)


def _shape(member: Any) -> tuple[int, int]:
    """(element size, element count) of a member's type; count 1 for a scalar."""
    t = member.get_DIE_from_attribute("DW_AT_type")
    count = 1
    while True:
        if t.tag == "DW_TAG_array_type":
            for sub in t.iter_children():
                if "DW_AT_count" in sub.attributes:
                    count *= sub.attributes["DW_AT_count"].value
                elif "DW_AT_upper_bound" in sub.attributes:
                    count *= sub.attributes["DW_AT_upper_bound"].value + 1
        elif "DW_AT_byte_size" in t.attributes:
            return t.attributes["DW_AT_byte_size"].value, count
        elif t.tag == "DW_TAG_pointer_type":
            return 8, count
        if "DW_AT_type" not in t.attributes:
            return 0, count
        t = t.get_DIE_from_attribute("DW_AT_type")


# -- reading the process ------------------------------------------------------------------


class Memory:
    """The target's memory, read with pread on /proc/PID/mem (root, or ptrace access)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        self._pagemap: int | None = None

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, addr)
        except OSError as e:
            raise Torn(f"unreadable at {addr:#x}") from e
        if len(data) != size:
            raise Torn(f"short read at {addr:#x}")
        return data

    def u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def resident(self, start: int, end: int) -> int:
        """Bytes of [start, end) whose pages are in RAM (pagemap's present bit)."""
        return self.resident_spans(start, end, array("Q", (start, end)))

    def resident_spans(self, start: int, end: int, spans: array[int]) -> int:
        """Bytes of the `spans` (flat start, end pairs inside [start, end)) whose pages
        are in RAM: pagemap is read once for the whole range, and its present bits
        (bit 63: the top bit of each entry's last byte) counted at C speed, with no
        Python object per page or span (a fragmented heap has hundreds of thousands:
        a read every few seconds would churn natrace's own heap)."""
        if end <= start or not spans:
            return 0
        base = start // PAGE
        try:
            if self._pagemap is None:
                self._pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
            data = os.pread(self._pagemap, 8 * ((end - 1) // PAGE - base + 1), 8 * base)
        except OSError:
            return 0
        present = data[7::8].translate(_PRESENT)  # one byte per page: 1 in RAM, else 0
        pages = len(present)
        total = 0
        for i in range(0, len(spans), 2):
            a, b = spans[i], spans[i + 1]
            first, last = a // PAGE - base, (b - 1) // PAGE - base
            if b <= a or first < 0 or last >= pages:
                continue
            total += present.count(1, first, last + 1) * PAGE
            if present[first]:
                total -= a - (first + base) * PAGE
            if present[last]:
                total -= (last + base + 1) * PAGE - b
        return total

    def close(self) -> None:
        for fd in (self._fd, self._pagemap):
            if fd is not None:
                os.close(fd)


def resident_bytes(pid: int, ranges: Sequence[tuple[int, int]]) -> int | None:
    """Bytes of the [start, end) ranges in RAM (pagemap); None if unreadable."""
    try:
        mem = Memory(pid)
    except OSError:
        return None
    try:
        return sum(mem.resident(start, end) for start, end in ranges)
    finally:
        mem.close()


@dataclass(frozen=True)
class _Range:
    start: int
    end: int


class _Arena:
    """One arena's address and the ranges its chunks may lie in."""

    def __init__(self, address: int, main: bool, ranges: list[_Range]) -> None:
        self.address = address
        self.main = main
        self.ranges = ranges

    def holds(self, addr: int, size: int = MINSIZE) -> bool:
        return any(r.start <= addr and addr + size <= r.end for r in self.ranges)


def read_books(pid: int, regions: Sequence[Region], heaps: Sequence[ArenaHeap],
               threads: int | None = None, debug_dirs: Sequence[str] | None = None,
               cache_dir: str | None = None) -> AllocatorBooks:
    """The allocator's books now. `regions` are the process's smaps regions and `heaps`
    the arena heaps found among them (tracer.memory.regions)."""
    at = time.time()
    other = next((r.path for r in regions if r.backing == "file"
                  and _OTHER_ALLOCATOR.search(r.path)), None)
    if other is not None:
        name = _OTHER_ALLOCATOR.search(other).group(2)  # type: ignore[union-attr]
        return AllocatorBooks(name, False, _unreadable(name, _openable(pid, other)), at=at,
                              threads=threads)
    libc = next((r for r in regions if r.backing == "file" and _LIBC.search(r.path)), None)
    if libc is None:
        return AllocatorBooks("glibc", False, "no libc.so.6 mapped (a static program?): "
                              "glibc's malloc books cannot be found", at=at, threads=threads)
    base = _load_base(pid, libc.path, regions)
    try:
        layout = layout_for(_openable(pid, libc.path), debug_dirs, cache_dir)
    except NoLayout as e:
        return AllocatorBooks("glibc", False, str(e), at=at, threads=threads)
    try:
        mem = Memory(pid)
    except OSError as e:
        return AllocatorBooks("glibc", False, f"cannot read /proc/{pid}/mem "
                              f"({e.strerror}): run as root", at=at, threads=threads)
    try:
        why = ""
        for attempt in range(REGION_ROUNDS + 1):
            if attempt:
                # a growing arena's top moves into a heap (or a part of one) mapped after
                # `regions` were read: read them again, then the books
                regions = read_smaps(pid)
                heaps = find_arenas(pid, regions).heaps
            try:
                books = _read(mem, layout, base, regions, heaps, threads, at)
            except Torn as e:  # the arena list or libc's own data moved under us
                why = str(e)
                continue
            if not books.torn:
                return books
        if why:
            return AllocatorBooks("glibc", False, f"the process changed while its books "
                                  f"were read ({why}): not trusted", at=at, threads=threads)
        return books
    except OSError as e:  # gone (exit, exec) while read
        return AllocatorBooks("glibc", False, f"cannot read the process's books "
                              f"({e.strerror})", at=at, threads=threads)
    finally:
        mem.close()


_REASONS: dict[tuple[Any, ...], str] = {}  # (allocator, device, inode, mtime) -> reason


def _unreadable(allocator: str, path: str) -> str:
    """Why another allocator's books are not read; remembered per file, like layouts."""
    try:
        st = os.stat(path)
    except OSError:
        return _unreadable_now(allocator, path)
    key = (allocator, st.st_dev, st.st_ino, st.st_mtime_ns)
    if key not in _REASONS:
        _REASONS[key] = _unreadable_now(allocator, path)
    return _REASONS[key]


def _unreadable_now(allocator: str, path: str) -> str:
    syms = ElfSymbols(path, cache_dir="")
    debug = ("its debug info is here but natrace reads only glibc's layout"
             if syms.debug_file or syms.source == "symtab" else
             f"no debug info for {os.path.basename(path)} (build-id {syms.build_id})")
    return (f"the process allocates with {allocator}: its books are not read ({debug}), so "
            f"live vs free inside {allocator} and the pages it retains are not measured; "
            f"its mappings count as anonymous memory")


def _openable(pid: int, path: str) -> str:
    inside = f"/proc/{pid}/root{path}"
    return inside if os.path.exists(inside) else path


def _load_base(pid: int, path: str, regions: Sequence[Region]) -> int:
    """Where offset 0 of libc is mapped (its first mapping maps offset 0); from the
    regions read before when the process has just exited."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 6 and f[5] == path and int(f[2], 16) == 0:
                    return int(f[0].split("-")[0], 16)
    except OSError:
        pass  # gone meanwhile: what it mapped is in `regions`
    return min(r.start for r in regions if r.path == path)


def _read(mem: Memory, layout: Layout, base: int, regions: Sequence[Region],
          heaps: Sequence[ArenaHeap], threads: int | None, at: float) -> AllocatorBooks:
    mp = base + layout.addresses["mp_"]
    par = mem.read(mp, layout.sizes["malloc_par"])

    def p(member: str) -> int:
        o, size, _ = layout.members["malloc_par"][member]
        return int.from_bytes(par[o:o + size], "little")

    main = base + layout.addresses["main_arena"]
    brk = [_Range(r.start, r.end) for r in regions if r.backing == "heap"]
    arenas = _arena_list(mem, layout, main, brk, heaps)
    missing = {h.arena for h in heaps if h.arena is not None} - {a.address for a in arenas}
    if missing:
        raise Torn(f"{len(missing)} arenas with heaps are not on main_arena's list")
    books = AllocatorBooks("glibc", True, at=at, threads=threads, mmapped=p("mmapped_mem"),
                           mmapped_blocks=p("n_mmaps"), trim_threshold=p("trim_threshold"),
                           arena_max=p("arena_max"))
    for arena in arenas:
        until = time.monotonic() + ARENA_BUDGET
        for _ in range(ATTEMPTS):
            try:
                books.arenas.append(_read_arena(mem, layout, arena, heaps))
                break
            except TooMany:
                books.unwalked.append(arena.address)
                break
            except Torn:
                if time.monotonic() > until:
                    books.torn.append(arena.address)
                    break
                time.sleep(BUSY_WAIT)
        else:
            books.torn.append(arena.address)
    books.mmapped_found, books.mmapped_resident = _mmapped_chunks(mem, regions)
    books.tcaches = _tcaches(mem, layout, arenas, p("sbrk_base"), p("tcache_bins"),
                             p("tcache_count"))
    tcache_chunk = _tcache_chunk(layout)
    books.structs = (sum(layout.sizes["malloc_state"] for a in arenas if not a.main)
                     + sum(layout.sizes["_heap_info"] for h in heaps if h.arena is not None)
                     + tcache_chunk * len(books.tcaches))
    return books


def _arena_list(mem: Memory, layout: Layout, main: int, brk: list[_Range],
                heaps: Sequence[ArenaHeap]) -> list[_Arena]:
    """main_arena, then its `next` list: each must be the arena of a heap found."""
    by_arena: dict[int, list[_Range]] = {}
    for h in heaps:
        if h.arena is not None:
            by_arena.setdefault(h.arena, []).append(_Range(h.start, h.start + h.mapped))
    out = [_Arena(main, True, brk)]
    nxt = layout.off("malloc_state", "next")
    addr = main
    for _ in range(MAX_ARENAS):
        addr = mem.u64(addr + nxt)
        if addr == main:
            return out
        if addr not in by_arena:  # not one of the heaps' arenas: never guess
            raise Torn(f"arena {addr:#x} has no heap among the regions read")
        out.append(_Arena(addr, False, by_arena[addr]))
    raise Torn("the arena list does not come back to main_arena")


def _read_arena(mem: Memory, layout: Layout, arena: _Arena,
                heaps: Sequence[ArenaHeap]) -> ArenaBooks:
    size = layout.sizes["malloc_state"]
    raw = mem.read(arena.address, size)

    def field(member: str, i: int = 0) -> int:
        o = layout.off("malloc_state", member) + 8 * i
        return int.from_bytes(raw[o:o + 8], "little")

    if struct.unpack_from("<i", raw, layout.off("malloc_state", "mutex"))[0]:
        raise Torn("arena locked")
    system_mem = field("system_mem")
    top = field("top")
    bin0 = arena.address + layout.off("malloc_state", "bins") - 2 * SIZE_SZ
    # never used: another allocator, or no malloc yet (top is 0 until malloc's first call
    # initializes the arena, then the unsorted bin's address until memory is taken)
    if system_mem == 0 and top in (0, bin0):
        return ArenaBooks(arena.address, arena.main, 0, 0, 0, 0, 0, 0, 0, 0)
    walk = _Walk(mem, arena)
    top_size = walk.chunk_size(top)
    if not arena.holds(top, top_size):
        raise Torn("top chunk outside the arena's heaps")
    fast = sum(walk.fastbin(field("fastbinsY", i), (i + 2) * ALIGN)
               for i in range(layout.count("malloc_state", "fastbinsY")))
    bins = [0, 0, 0]  # unsorted, small, large
    for i in range(1, layout.count("malloc_state", "bins") // 2 + 1):
        head = bin0 + (i - 1) * 2 * SIZE_SZ
        kind = 0 if i == 1 else 1 if i < 64 else 2
        bins[kind] += walk.bin(head, field("bins", 2 * (i - 1) + 1), i)
    if mem.read(arena.address, size) != raw:
        raise Torn("arena changed during the walk")
    walk.span(top + 2 * SIZE_SZ, top + top_size)
    resident = sum(mem.resident_spans(r.start, r.end, walk.spans_in(r.start, r.end))
                   for r in arena.ranges)
    nheaps = 1 if arena.main else sum(1 for h in heaps if h.arena == arena.address)
    return ArenaBooks(arena.address, arena.main, nheaps, system_mem, top_size, fast, bins[0],
                      bins[1], bins[2], walk.chunks, resident)


class _Walk:
    """Free-list walks of one arena, every pointer checked."""

    def __init__(self, mem: Memory, arena: _Arena) -> None:
        self.mem = mem
        self.arena = arena
        self.chunks = 0
        self.spans = array("Q")  # free bytes (start, end, ...), for the residency count

    def span(self, start: int, end: int) -> None:
        self.spans.append(start)
        self.spans.append(end)

    def spans_in(self, start: int, end: int) -> array[int]:
        """The spans that start in [start, end), flat as `spans`."""
        spans = self.spans
        if len(self.arena.ranges) == 1:
            return spans  # every span lies in the arena's one range
        out = array("Q")
        for i in range(0, len(spans), 2):
            if start <= spans[i] < end:
                out.append(spans[i])
                out.append(spans[i + 1])
        return out

    def chunk_size(self, p: int) -> int:
        if p % ALIGN or not self.arena.holds(p):
            raise Torn(f"chunk {p:#x} outside the arena")
        return self.mem.u64(p + SIZE_SZ) & ~SIZE_BITS

    def _count(self) -> None:
        self.chunks += 1
        if self.chunks > MAX_CHUNKS:
            raise TooMany(f"more than {MAX_CHUNKS:,} free chunks")

    def fastbin(self, p: int, want: int) -> int:
        total = 0
        while p:
            self._count()
            if self.chunk_size(p) != want:
                raise Torn("fastbin chunk of the wrong size")
            total += want
            self.span(p + 2 * SIZE_SZ, p + want)
            fd_at = p + 2 * SIZE_SZ
            p = (fd_at >> 12) ^ self.mem.u64(fd_at)  # safe-linking (glibc 2.32+)
        return total

    def bin(self, head: int, last: int, index: int) -> int:
        """Walk bin `index` backwards from its head, as mallinfo does."""
        total, prev, p = 0, head, last
        while p != head:
            self._count()
            if p % ALIGN or not self.arena.holds(p, 4 * SIZE_SZ):
                raise Torn("bin chunk outside the arena")
            _, size, fd, bk = struct.unpack("<4Q", self.mem.read(p, 4 * SIZE_SZ))
            size &= ~SIZE_BITS
            if fd != prev or not _fits_bin(size, index) or not self.arena.holds(p, size):
                raise Torn("bin chunk inconsistent with its list")
            prev_size, next_size = struct.unpack("<2Q", self.mem.read(p + size, 2 * SIZE_SZ))
            if prev_size != size or next_size & PREV_INUSE:
                raise Torn("free chunk's footer disagrees")
            self.span(p + 2 * SIZE_SZ, p + size)
            total += size
            prev, p = p, bk
        return total


def _fits_bin(size: int, index: int) -> bool:
    if size < MINSIZE:
        return False
    if index == 1:
        return True
    if index < 64:
        return size == index * ALIGN
    return _largebin_index(size) == index


def _largebin_index(sz: int) -> int:
    """glibc's largebin_index_64."""
    for shift, limit, base in ((6, 48, 48), (9, 20, 91), (12, 10, 110), (15, 4, 119),
                               (18, 2, 124)):
        if (sz >> shift) <= limit:
            return base + (sz >> shift)
    return 126


def _mmapped_chunks(mem: Memory, regions: Sequence[Region]) -> tuple[int, int]:
    """Blocks glibc mapped one by one: anonymous regions tiled by chunks whose size has
    IS_MMAPPED set (adjacent mappings merge into one region). (bytes, resident bytes);
    the bytes should equal mp_.mmapped_mem."""
    found = resident = 0
    for r in regions:
        if r.backing != "anonymous" or r.perms[:3] != "rw-" or r.size < 2 * PAGE:
            continue
        p, chunks = r.start, []
        while p < r.end:
            try:
                prev_size, size = struct.unpack("<2Q", mem.read(p, 2 * SIZE_SZ))
            except Torn:
                break
            length = size & ~SIZE_BITS
            if not size & IS_MMAPPED or prev_size or length % PAGE or length == 0 \
                    or p + length > r.end:
                break
            chunks.append((p, length))
            p += length
        if p == r.end:  # the whole region is mmapped chunks, or none of it counts
            found += sum(n for _, n in chunks)
            resident += sum(mem.resident(a, a + n) for a, n in chunks)
    return found, resident


def _tcaches(mem: Memory, layout: Layout, arenas: list[_Arena], sbrk_base: int,
             nbins: int, max_count: int) -> list[TcacheBooks]:
    """The tcache_perthread_struct at the start of each arena's first heap: a thread's
    first malloc makes it there. Threads sharing an arena have theirs elsewhere; those
    are not reachable without the thread pointer and are left out."""
    def anywhere(addr: int) -> bool:
        return any(a.holds(addr) for a in arenas)

    chunk = _tcache_chunk(layout)
    out = []
    for arena in arenas:
        first = sbrk_base if arena.main else arena.address + layout.sizes["malloc_state"]
        first += -(first + 2 * SIZE_SZ) % ALIGN
        for _ in range(ATTEMPTS):
            try:
                found = _tcache_at(mem, layout, arena, anywhere, first, chunk, nbins,
                                   max_count)
                break
            except Torn:
                time.sleep(BUSY_WAIT)
        else:
            found = None
        if found is not None:
            out.append(found)
    return out


def _tcache_chunk(layout: Layout) -> int:
    return (layout.sizes["tcache_perthread_struct"] + SIZE_SZ + ALIGN - 1) & ~(ALIGN - 1)


def _tcache_at(mem: Memory, layout: Layout, arena: _Arena, anywhere: Callable[[int], bool],
               p: int, chunk: int, nbins: int, max_count: int) -> TcacheBooks | None:
    """A thread frees into its own tcache blocks of any arena: entries may lie in any."""
    if not arena.holds(p, chunk) or mem.u64(p + SIZE_SZ) & ~SIZE_BITS != chunk:
        return None
    raw = mem.read(p + 2 * SIZE_SZ, layout.sizes["tcache_perthread_struct"])
    co, cs = layout.off("tcache_perthread_struct", "counts"), \
        layout.elem("tcache_perthread_struct", "counts")
    eo = layout.off("tcache_perthread_struct", "entries")
    nbins = min(nbins, layout.count("tcache_perthread_struct", "counts"))
    counts = [int.from_bytes(raw[co + i * cs:co + (i + 1) * cs], "little") for i in range(nbins)]
    entries = list(struct.unpack_from(f"<{nbins}Q", raw, eo))
    if any(c > max_count or (c == 0) != (e == 0) for c, e in zip(counts, entries)):
        return None  # not a tcache (or not yet one)
    keys: set[int] = set()
    for i, (c, e) in enumerate(zip(counts, entries)):
        for _ in range(c):
            if not e or e % ALIGN or not anywhere(e - 2 * SIZE_SZ):
                raise Torn("tcache entry outside the arena")
            if mem.u64(e - SIZE_SZ) & ~SIZE_BITS != MINSIZE + i * ALIGN:
                raise Torn("tcache entry of the wrong size")
            nxt, key = struct.unpack("<2Q", mem.read(e, 2 * SIZE_SZ))
            keys.add(key)
            e = (e >> 12) ^ nxt
        if e:
            raise Torn("tcache list longer than its count")
    if len(keys) > 1:
        raise Torn("tcache entries with different keys")
    chunks = sum(counts)
    return TcacheBooks(p, arena.address, chunks,
                       sum(c * (MINSIZE + i * ALIGN) for i, c in enumerate(counts)))


def _layout_main(argv: list[str]) -> int:
    """The child of _layout_from_dwarf: DEBUG_FILE BUILD_ID in, the layout as JSON out,
    or why there is none on stderr."""
    try:
        layout = _layout_in_process(argv[0], argv[1])
    except NoLayout as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(asdict(layout)))
    return 0


if __name__ == "__main__":
    sys.exit(_layout_main(sys.argv[1:]))
