"""The allocator's own books, as read from the process's memory: per arena, what the
allocator took from the system and how much of it is free inside it.

These are the figures glibc's mallinfo2() would give, arena by arena, read from
outside; they tell a leak (live bytes growing) from fragmentation (free bytes the
allocator keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArenaBooks:
    """One glibc arena (a malloc_state): bytes by where they sit. `free_resident` is the
    part of the free bytes whose pages are in RAM (whole pages inside free chunks)."""

    address: int
    main: bool
    heaps: int  # 64 MiB heaps (non-main arenas); the main arena's brk heap counts 1
    system_mem: int
    top: int  # the top chunk: free, at the end of the last heap
    fastbins: int
    unsorted: int
    smallbins: int
    largebins: int
    free_chunks: int  # chunks in the bins and fastbins (not the top, not tcache)
    free_resident: int = 0

    @property
    def free(self) -> int:
        """What mallinfo2's fordblks counts for this arena (tcache not included)."""
        return self.top + self.fastbins + self.unsorted + self.smallbins + self.largebins


@dataclass(frozen=True)
class TcacheBooks:
    """One thread's tcache (tcache_perthread_struct), found at the start of a heap."""

    address: int
    arena: int
    chunks: int
    bytes: int


@dataclass
class AllocatorBooks:
    """Snapshot.memory.books: `readable` False says in `reason` (one line) what could
    not be read and why; `torn` lists arenas that kept changing under every read,
    `unwalked` those with more free chunks than a walk follows."""

    allocator: str  # glibc, jemalloc, tcmalloc, mimalloc
    readable: bool
    reason: str | None = None
    at: float = 0.0
    arenas: list[ArenaBooks] = field(default_factory=list)
    torn: list[int] = field(default_factory=list)
    unwalked: list[int] = field(default_factory=list)  # arenas with too many free chunks
    tcaches: list[TcacheBooks] = field(default_factory=list)
    threads: int | None = None
    mmapped: int = 0  # blocks glibc mapped one by one (mp_.mmapped_mem)
    mmapped_blocks: int = 0
    mmapped_found: int = 0  # of those, found in the process's regions (should be all)
    mmapped_resident: int = 0
    structs: int = 0  # the allocator's own records in its heaps: malloc_state, heap_info, tcaches
    trim_threshold: int | None = None
    arena_max: int | None = None  # MALLOC_ARENA_MAX as the process sees it (0: default)

    @property
    def system_mem(self) -> int:
        return sum(a.system_mem for a in self.arenas)

    @property
    def free(self) -> int:
        """Free inside the allocator as mallinfo2's fordblks counts it."""
        return sum(a.free for a in self.arenas)

    @property
    def free_resident(self) -> int:
        return sum(a.free_resident for a in self.arenas)

    @property
    def tcache(self) -> int:
        return sum(t.bytes for t in self.tcaches)

    @property
    def in_use(self) -> int:
        """Bytes in chunks handed out (headers included): live blocks, tcache excluded."""
        return self.system_mem - self.free - self.tcache + self.mmapped

    @property
    def overhead(self) -> int:
        """Bytes the allocator uses for itself: its records plus blocks cached per thread."""
        return self.structs + self.tcache

    @property
    def complete(self) -> bool:
        return self.readable and not self.torn and not self.unwalked


@dataclass(frozen=True, slots=True)  # slots: the memory watch keeps up to 512 of them
class BooksReading:
    """One reading of the books, for the timeline a leak verdict needs."""

    at: float
    in_use: int
    free: int
    free_resident: int


@dataclass(frozen=True)
class RssPart:
    """One measured part of RSS: `key` is stable (live, large, free, overhead, v8,
    stacks, files, heaps, other), `how` says what measured it."""

    key: str
    label: str
    bytes: int
    how: str


@dataclass
class RssSplit:
    """RSS as the sum of its measured parts (the parts add up to `rss`)."""

    rss: int
    parts: list[RssPart] = field(default_factory=list)
    free_by_arena: list[tuple[int, int]] = field(default_factory=list)  # (arena, resident free)
    traced_malloc: int | None = None  # live malloc bytes tracing saw (None: not traced)
    traced_mmap: int | None = None  # live anonymous mappings the program made (traced)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why

    def part(self, key: str) -> int:
        return sum(p.bytes for p in self.parts if p.key == key)


@dataclass
class Verdict:
    """Leak, fragmentation/retention, both, neither, or unknown, with the evidence and
    only the advice the books support."""

    kind: str  # leak | fragmentation | both | neither | unknown
    evidence: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        return {"leak": "leak: live bytes are growing",
                "fragmentation": "fragmentation/retention: the allocator holds free memory "
                                 "it does not return",
                "both": "leak and fragmentation/retention: live bytes grow, and the "
                        "allocator holds free memory it does not return",
                "neither": "no leak and no fragmentation seen",
                "unknown": "leak or fragmentation: cannot tell"}[self.kind]


def metrics(books: AllocatorBooks | None, split: RssSplit | None,
            verdict: Verdict | None) -> list[tuple[str, dict[str, str], float]]:
    """The books, the split and the verdict as (name, labels, value) gauges, for an
    agent to export (Prometheus names, bytes as base units)."""
    out: list[tuple[str, dict[str, str], float]] = []
    if split is not None:
        out += [("natrace_rss_part_bytes", {"part": p.key, "label": p.label}, p.bytes)
                for p in split.parts]
    if books is not None and books.complete:
        for a in books.arenas:
            arena = {"arena": "main" if a.main else hex(a.address)}
            out += [("natrace_allocator_free_bytes", arena, a.free),
                    ("natrace_allocator_free_resident_bytes", arena, a.free_resident),
                    ("natrace_allocator_system_bytes", arena, a.system_mem)]
        out += [("natrace_allocator_in_use_bytes", {}, books.in_use),
                ("natrace_allocator_tcache_bytes", {}, books.tcache)]
    if verdict is not None:
        out += [("natrace_memory_verdict", {"verdict": k}, float(verdict.kind == k))
                for k in ("leak", "fragmentation", "both", "neither", "unknown")]
    return out
