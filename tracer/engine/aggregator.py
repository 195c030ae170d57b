"""Raw kernel figures -> model Sites: symbolize stacks, charge each to a frame, group.

Sites are grouped by the function they are charged to (or module+offset where no
name is known), so one leaking function is one row however many call instructions
or callers it has; the heaviest stack represents the group.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from typing import TypeVar

from tracer.engine.callsites import CallSites
from tracer.model.mappings import Owner
from tracer.model.sites import Site
from tracer.probes.alloc import RawSite, stack_error_name
from tracer.symbols.attribution import (
    DEFAULT_ALLOCATOR_MODULES,
    THREAD_STACK_MAKERS,
    charge_frames,
    in_language_runtime,
    is_allocator_frame,
    made_by,
    made_by_allocator,
)

T = TypeVar("T")


def group_by(items: Iterable[T], key: Callable[[T], Hashable], weight: Callable[[T], int],
             merge: Callable[[T, T, bool], None]) -> list[T]:
    """Items merged per key, in first-seen order: the first item of a key becomes its
    group and each later one is merged into it with `merge(group, item, heavier)`,
    `heavier` telling whether the item outweighs every one before it (so the heaviest
    stack can represent the group)."""
    groups: dict[Hashable, T] = {}
    heaviest: dict[Hashable, int] = {}
    for item in items:
        k = key(item)
        have = groups.get(k)
        if have is None:
            groups[k] = item
            heaviest[k] = weight(item)
            continue
        heavier = weight(item) > heaviest[k]
        if heavier:
            heaviest[k] = weight(item)
        merge(have, item, heavier)
    return list(groups.values())


class Aggregator:
    def __init__(self, call_sites: CallSites, charge_to: str = "first",
                 allocator_modules: Collection[str] = DEFAULT_ALLOCATOR_MODULES) -> None:
        self.call_sites = call_sites
        self.charge_to = charge_to
        self.allocator_modules = allocator_modules  # whose malloc-family frames are skipped

    def sites(self, raw: Iterable[RawSite], stack_of: Callable[[int], tuple[int, ...]],
              mappings: Iterable[tuple[Owner, int, int, int, int]] = (),
              origin_ns: int = 0) -> list[Site]:
        """Every site that allocated while traced or still holds memory, freed or not
        (churn counts in allocated/allocations), most unfreed bytes first. `origin_ns`:
        when tracing began (CLOCK_MONOTONIC), for the sites' first/latest allocation."""
        sites: list[Site] = []
        for r in raw:
            if r.bytes == 0 and r.blocks == 0 and r.allocs == 0:
                continue
            if r.stack_id < 0:
                site = Site("malloc", [], r.bytes, r.blocks,
                            lost_stack=stack_error_name(r.stack_id))
            else:
                site = self._site("malloc", stack_of(r.stack_id), r.bytes, r.blocks, False)
                site.stack_ids = [r.stack_id]
            site.allocs, site.alloc_bytes = r.allocs, r.alloc_bytes
            site.samples, site.alloc_samples = r.samples, r.alloc_samples
            site.temp_allocs, site.temp_bytes = r.temp_allocs, r.temp_bytes
            site.first_at = (r.first_ns - origin_ns) / 1e9 if r.first_ns else None
            site.last_at = (r.last_ns - origin_ns) / 1e9 if r.last_ns else None
            sites.append(site)
        for owner, size, ranges, calls, made in mappings:
            site = self._site(owner.kind, owner.stack, size, ranges, owner.allocator_internal)
            site.allocs, site.alloc_bytes = calls, made
            sites.append(site)
        grouped = group_by(sites, lambda s: s.key, lambda s: (s.bytes << 64) + s.alloc_bytes,
                           _merge_site)
        for site in grouped:
            site.via = self._via(site)
        return sorted(grouped, key=lambda s: (-s.bytes, -s.blocks, -s.alloc_bytes, s.label()))

    def _via(self, site: Site) -> str | None:
        """The API of the module holding the bytes that the code outside it called
        (PQexec for a PGresult, whether the site is libpq's or, as by default, the
        caller's): named from the caller's own call instruction where it can be, since
        libraries tail-call static helpers that leave no named frame; else the library's
        outermost frame (PQconnectdb under ctypes' indirect call)."""
        frames, i = site.frames, site.charge_index
        library = site.library_index is not None  # charged to the caller: name the API
        if library:
            i = site.library_index or 0  # the system library that allocated (libpq)
        if not frames or frames[i].module_class in ("libc", "ld.so", "unknown"):
            return None
        runtime = frames[i - 1].symbol if i > 0 and not library else None
        if runtime and in_language_runtime(frames[i - 1]) and not is_allocator_frame(
                frames[i - 1], self.allocator_modules):
            return runtime.split("@", 1)[0]  # cache_insert via _M_assign
        j = i
        while j + 1 < len(frames) and frames[j + 1].module_class == frames[i].module_class:
            j += 1
        if j + 1 >= len(frames) or frames[j + 1].module_class in ("libc", "ld.so"):
            return None  # nothing outside called in: the module's own main, or a thread
        name = self.call_sites.callees.callee(frames[j + 1].address) or (
            frames[j].symbol if j > i or library else None)
        name = name.split("@", 1)[0] if name else None
        return name if name and (library or name != frames[i].symbol) else None

    def _site(self, kind: str, stack: tuple[int, ...], size: int, blocks: int,
              internal: bool) -> Site:
        frames = self.call_sites.frames(stack)
        charge, holder = (max(i, 0) for i in charge_frames(frames, self.charge_to,
                                                            self.allocator_modules))
        if kind == "mmap" and made_by(frames, THREAD_STACK_MAKERS):
            kind, internal = "stack", True  # the thread library's, like arenas are malloc's
        internal = internal or (kind != "malloc" and made_by_allocator(frames))
        return Site(kind, frames, size, blocks, charge_index=charge,
                    allocator_internal=internal, lost_stack=None if frames else "empty stack",
                    library_index=holder if frames and holder != charge else None)


def _merge_site(have: Site, site: Site, heavier: bool) -> None:
    if heavier:  # the heaviest stack represents the group
        have.frames, have.charge_index = site.frames, site.charge_index
        have.library_index = site.library_index
    have.bytes += site.bytes
    have.blocks += site.blocks
    have.allocs += site.allocs
    have.alloc_bytes += site.alloc_bytes
    have.samples += site.samples
    have.alloc_samples += site.alloc_samples
    have.temp_allocs += site.temp_allocs
    have.temp_bytes += site.temp_bytes
    have.first_at = _extreme(min, have.first_at, site.first_at)
    have.last_at = _extreme(max, have.last_at, site.last_at)
    have.stack_ids += site.stack_ids


def _extreme(pick: Callable[[float, float], float], a: float | None,
             b: float | None) -> float | None:
    return b if a is None else a if b is None else pick(a, b)
