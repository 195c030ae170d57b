"""Call sites that hold memory: malloc'd blocks, anonymous mappings, heap growth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tracer.model.frames import Frame, charged, function_key

SiteKey = tuple[str, bool, str, str, str]


@dataclass
class Site:
    """What was allocated through one call site: memory still held (`bytes`, `blocks`:
    unfreed) and every allocation made while traced, freed or not (`allocs`,
    `alloc_bytes`; a mapping site's accessible mmaps and brk growths), of which
    `temp_allocs`/`temp_bytes` were temporary (freed by the allocating thread before it
    allocated again, heaptrack's sense). `first_at`/
    `last_at`: seconds into the trace of its first and latest allocation (None: not
    known).

    `frames` run from the allocator's caller outwards; `charge_index` is the frame the
    bytes are charged to (first frame outside the allocator and its wrappers, or as
    --charge-to says). `library_index`, when set, is the frame of the system library
    whose code allocated for the charged function (libpq's, under vault_keep_results):
    the site is that library's in the module table (`module_class`), and `via` names
    the library function the charged frame called (PQexec). A site whose stack could not
    be captured has no frames and says why in `lost_stack` (e.g. "ENOSPC"): its bytes
    still count in every total.
    `allocator_internal` marks the runtime's own memory, left out of the program's
    totals: malloc's arenas and heap growth (their blocks are counted as malloc
    sites) and thread stacks (kind "stack").
    """

    kind: str  # "malloc", "mmap", "brk" or "stack"
    frames: list[Frame]
    bytes: int
    blocks: int
    allocs: int = 0
    alloc_bytes: int = 0
    charge_index: int = 0
    allocator_internal: bool = False
    lost_stack: str | None = None
    stack_ids: list[int] = field(default_factory=list)
    via: str | None = None  # the charged module's API its caller called (PQexec)
    library_index: int | None = None  # the system library's frame that allocated
    per_minute: float | None = None  # growth of `bytes` over the last minute traced
    suspect: bool = False  # growing steadily: a leak suspect (tracer/model/growth.py)
    samples: int = 0  # sampled in the process: the sampled blocks behind bytes/blocks
    alloc_samples: int = 0  # ... and behind allocs/alloc_bytes
    pid: int = 0  # the process it is of (0: the snapshot's own, e.g. an older recording)

    @staticmethod
    def interval(estimate: int, samples: int, period: int) -> tuple[int, int] | None:
        """95% interval of an estimate made from `samples` Poisson samples (in-process
        sampling: a count of sample points is Poisson, relative error 1/sqrt(n); blocks
        spanning several periods are measured more precisely, so this is conservative).
        A period of 1 samples every allocation: the figure is exact. None when the
        sample count is not known (a recording keeps the estimates, not the counts)."""
        if period == 1:
            return estimate, estimate
        if samples <= 0:
            return None if estimate else (0, 0)
        half = 1.96 * estimate / math.sqrt(samples)
        return max(0, round(estimate - half)), round(estimate + half)
    temp_allocs: int = 0
    temp_bytes: int = 0
    first_at: float | None = None
    last_at: float | None = None

    @property
    def holds(self) -> bool:
        """Does the site still hold memory (not every block it allocated was freed)?"""
        return self.bytes != 0 or self.blocks != 0

    @property
    def frame(self) -> Frame | None:
        return charged(self.frames, self.charge_index)

    @property
    def module_class(self) -> str:
        """The module the bytes count to (the module table's): the library that allocated
        them for the charged function, else the charged function's own."""
        frame = self.frame if self.library_index is None else \
            charged(self.frames, self.library_index)
        return frame.module_class if frame else "unknown"

    @property
    def key(self) -> SiteKey:
        """Identity of the site across stacks and snapshots: kind, allocator-internal, the
        function it is charged to (module+symbol, else module+offset) and the library
        that allocated for it ("" for the function's own allocations)."""
        library = "" if self.library_index is None else self.module_class
        return (self.kind, self.allocator_internal, *function_key(self.frame, self.lost_stack),
                library)

    @property
    def library_via(self) -> str:
        """What tables add to the label of a library's allocations charged to their
        caller: the library function it called (`vault_keep_results via PQexec`)."""
        return f" via {self.via}" if self.library_index is not None and self.via else ""

    def label(self, short: bool = False) -> str:
        """The charged frame's label (`short`: names shortened for tables)."""
        frame = self.frame
        if frame is None:
            return f"[stack not captured: {self.lost_stack}]"
        return frame.label(short)
