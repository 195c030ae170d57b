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
    not be read and why; `torn` lists arenas that kept changing under every read."""

    allocator: str  # glibc, jemalloc, tcmalloc, mimalloc
    readable: bool
    reason: str | None = None
    at: float = 0.0
    arenas: list[ArenaBooks] = field(default_factory=list)
    torn: list[int] = field(default_factory=list)
    tcaches: list[TcacheBooks] = field(default_factory=list)
    threads: int | None = None
    mmapped: int = 0  # blocks glibc mapped one by one (mp_.mmapped_mem)
    mmapped_blocks: int = 0
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
    def complete(self) -> bool:
        return self.readable and not self.torn
