"""Handle lifecycles: per create/destroy pair, how many handles live and who made them.

Bytes per call site show a leak's symptom; live PGresults, PGconns or napi
references per creation site show its cause in the library's own terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.callsite import CallSite


@dataclass
class HandleSite:
    """Live handles made through one creation call site (grouped by its function).

    `site.frame` is the first frame outside the pair's library; `site.via` the library
    function it called (PQexec for a PGresult made inside PQmakeEmptyPGresult)."""

    site: CallSite
    live: int
    created: int  # since natrace attached
    oldest_age: float | None = None  # seconds; None when no live handle was read


@dataclass
class HandleType:
    """One create/destroy pair and its figures since natrace attached.

    live = created - destroyed - stale. `unknown` destroys are of handles made before
    natrace attached (or not tracked): counted, never an error."""

    name: str  # "libpq PGresult"
    library: str  # the file probed
    create: list[str]
    destroy: str
    destroy_arg: int
    preset: bool
    created: int = 0
    destroyed: int = 0
    unknown: int = 0
    live: int = 0
    stale: int = 0  # a create returned a live handle's address: its destroy was missed
    untracked: int = 0  # handles not tracked: live map full
    per_minute: float | None = None  # growth of the live count (least-squares slope)
    oldest_age: float | None = None  # seconds
    sites: list[HandleSite] = field(default_factory=list)  # most live handles first

    @property
    def top(self) -> HandleSite | None:
        return self.sites[0] if self.sites else None

    def share(self, site: HandleSite) -> float:
        """Share of the live handles made at `site` (0 when none live)."""
        return site.live / self.live if self.live > 0 else 0.0
