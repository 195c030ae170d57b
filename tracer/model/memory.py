"""What the kernel says the traced process holds: RSS over time, its regions, its glibc
arenas, the allocator's books, RSS split into measured parts, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.books import AllocatorBooks, BooksReading, RssSplit, Verdict


@dataclass(frozen=True, slots=True)  # slots: a timeline keeps up to 2048 of them
class MemorySample:
    """One reading of the process's memory counters (bytes; uss/pss/swap None when the
    kernel would not say)."""

    at: float  # seconds since the epoch
    rss: int
    vms: int
    uss: int | None = None
    pss: int | None = None
    swap: int | None = None


@dataclass(frozen=True)
class Region:
    """One mapping, with what backs it: heap, stack, anonymous, file, arena, or
    the name in `[anon:NAME]` / `[stack:TID]` / `[vdso]`."""

    start: int
    end: int
    perms: str
    backing: str
    path: str
    rss: int

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"


@dataclass(frozen=True)
class BackingTotal:
    backing: str
    regions: int
    size: int
    rss: int


@dataclass
class RegionSummary:
    """Counts over /proc/PID/smaps, with the largest regions by size and by RSS."""

    at: float
    regions: int
    writable: int
    max_map_count: int | None
    by_backing: list[BackingTotal] = field(default_factory=list)
    largest_by_size: list[Region] = field(default_factory=list)
    largest_by_rss: list[Region] = field(default_factory=list)

    @property
    def headroom(self) -> int | None:
        """Mappings left before mmap fails with ENOMEM (vm.max_map_count)."""
        return None if self.max_map_count is None else self.max_map_count - self.regions


@dataclass(frozen=True)
class ArenaHeap:
    """One glibc heap: a 64 MiB-aligned reservation, `mapped` bytes of it read-write."""

    start: int
    reserved: int
    mapped: int
    rss: int
    arena: int | None = None  # the arena (malloc_state address) it serves, when read


@dataclass
class ArenaSummary:
    """glibc's per-thread malloc arenas, found from their heap reservations."""

    heaps: list[ArenaHeap] = field(default_factory=list)
    arenas: int = 0  # distinct arenas (not counting the main arena, which lives in brk)
    verified: bool = False  # heap headers read from the process's memory agree
    threads: int | None = None
    dominates: list[str] = field(default_factory=list)  # "VMS" and/or "RSS"
    traced_heap_bytes: int | None = None  # allocator mmap bytes seen making heaps

    @property
    def reserved(self) -> int:
        return sum(h.reserved for h in self.heaps)

    @property
    def rss(self) -> int:
        return sum(h.rss for h in self.heaps)


@dataclass
class MemoryReport:
    """Snapshot.memory: everything the kernel can tell about the process's memory."""

    timeline: list[MemorySample] = field(default_factory=list)
    regions: RegionSummary | None = None
    arenas: ArenaSummary | None = None
    books: AllocatorBooks | None = None  # the allocator's own books, read from outside
    books_timeline: list[BooksReading] = field(default_factory=list)
    split: RssSplit | None = None  # RSS as measured parts
    verdict: Verdict | None = None  # leak, fragmentation/retention, both, neither

    @property
    def last(self) -> MemorySample | None:
        return self.timeline[-1] if self.timeline else None
