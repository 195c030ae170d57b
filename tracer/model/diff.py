"""Growth between two snapshots (before/after a deploy, two times of one recording):
per site, matched by `Site.key`, and per module class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tracer.model.sites import SiteKey
from tracer.model.snapshot import Snapshot


@dataclass
class Growth:
    """One site or module's unfreed bytes and blocks before and after."""

    name: str
    module_class: str
    kind: str
    before_bytes: int = 0
    after_bytes: int = 0
    before_blocks: int = 0
    after_blocks: int = 0

    @property
    def bytes(self) -> int:
        return self.after_bytes - self.before_bytes

    @property
    def blocks(self) -> int:
        return self.after_blocks - self.before_blocks


@dataclass
class SnapshotDiff:
    before: Snapshot
    after: Snapshot
    sites: list[Growth]  # largest growth first; sites that vanished have negative growth
    modules: list[Growth]

    @property
    def bytes(self) -> int:
        return self.after.total_bytes() - self.before.total_bytes()

    @property
    def blocks(self) -> int:
        return self.after.total_blocks() - self.before.total_blocks()


def diff(before: Snapshot, after: Snapshot) -> SnapshotDiff:
    sites: dict[SiteKey, Growth] = {}
    modules: dict[str, Growth] = {}
    for snap, is_after in ((before, False), (after, True)):
        for site in snap.user_sites():
            for row in (_row(sites, site.key, site.label() + site.library_via, site.module_class,
                             site.kind),
                        _row(modules, site.module_class, site.module_class,
                             site.module_class, "")):
                if is_after:
                    row.after_bytes += site.bytes
                    row.after_blocks += site.blocks
                else:
                    row.before_bytes += site.bytes
                    row.before_blocks += site.blocks
    return SnapshotDiff(before, after,
                        sorted((g for g in sites.values() if g.bytes or g.blocks),
                               key=_largest_first),
                        sorted(modules.values(), key=_largest_first))


def _largest_first(g: Growth) -> tuple[int, int, str]:
    return (-g.bytes, -g.blocks, g.name)


def _row(rows: dict[Any, Growth], key: Any, name: str, module_class: str, kind: str) -> Growth:
    row = rows.get(key)
    if row is None:
        row = rows[key] = Growth(name, module_class, kind)
    return row
