"""Raw kernel figures -> model Sites: symbolize stacks, charge each to a frame, group.

Sites are grouped by the function they are charged to (or module+offset where no
name is known), so one leaking function is one row however many call instructions
or callers it has; the heaviest stack represents the group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tracer.attribution import charge_frame
from tracer.mappings import Owner
from tracer.model.sites import Site, SiteKey
from tracer.probes.alloc import RawSite, stack_error_name
from tracer.symbolizer import Symbolizer


class Aggregator:
    def __init__(self, symbolizer: Symbolizer, charge_to: str = "first") -> None:
        self.symbolizer = symbolizer
        self.charge_to = charge_to

    def sites(self, raw: Iterable[RawSite], stack_of: Callable[[int], tuple[int, ...]],
              mappings: Iterable[tuple[Owner, int, int]] = ()) -> list[Site]:
        groups: dict[SiteKey, Site] = {}
        heaviest: dict[SiteKey, int] = {}
        for r in raw:
            if r.bytes == 0 and r.blocks == 0:
                continue
            if r.stack_id < 0:
                lost = Site("malloc", [], r.bytes, r.blocks, r.allocs, r.alloc_bytes,
                            lost_stack=stack_error_name(r.stack_id))
                self._add(groups, heaviest, lost)
                continue
            site = self._site("malloc", stack_of(r.stack_id), r.bytes, r.blocks, False)
            site.allocs, site.alloc_bytes, site.stack_ids = r.allocs, r.alloc_bytes, [r.stack_id]
            self._add(groups, heaviest, site)
        for owner, size, ranges in mappings:
            self._add(groups, heaviest,
                      self._site(owner.kind, owner.stack, size, ranges, owner.allocator_internal))
        return sorted(groups.values(), key=lambda s: (-s.bytes, -s.blocks, s.label()))

    def _site(self, kind: str, stack: tuple[int, ...], size: int, blocks: int,
              internal: bool) -> Site:
        frames = self.symbolizer.frames(stack)
        charge = charge_frame(frames, self.charge_to) if frames else 0
        return Site(kind, frames, size, blocks, charge_index=max(charge, 0),
                    allocator_internal=internal, lost_stack=None if frames else "empty stack")

    @staticmethod
    def _add(groups: dict[SiteKey, Site], heaviest: dict[SiteKey, int], site: Site) -> None:
        key = site.key
        have = groups.get(key)
        if have is None:
            groups[key] = site
            heaviest[key] = site.bytes
            return
        if site.bytes > heaviest[key]:  # the heaviest stack represents the group
            heaviest[key] = site.bytes
            have.frames, have.charge_index = site.frames, site.charge_index
        have.bytes += site.bytes
        have.blocks += site.blocks
        have.allocs += site.allocs
        have.alloc_bytes += site.alloc_bytes
        have.stack_ids += site.stack_ids
