"""Weighted stacks for the flamegraph exports: which metric, which frames, what names.

Every export format (folded, html/svg, speedscope, pprof) starts from the same stacks:
one per user site (its representative stack, root first) weighted by the chosen
allocation metric, so every format sums to the report's totals; or one per futex
waiter (nanoseconds blocked) or faulting call site (page faults) from the snapshot's
locks and faults sections.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from tracer.errors import UsageError
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str  # "bytes", "count" or "nanoseconds"
    description: str
    section: str | None = None  # Snapshot field the metric needs, beyond its sites


METRICS = {m.name: m for m in (
    Metric("unfreed", "bytes", "bytes allocated and not freed"),
    Metric("allocated", "bytes", "bytes allocated while traced (freed or not)"),
    Metric("allocations", "count", "allocations made while traced (freed or not)"),
    Metric("temporary", "count", "temporary allocations (freed by the thread before its "
           "next allocation)"),
    Metric("futex-wait", "nanoseconds", "time waited on futexes", section="locks"),
    Metric("page-faults", "count", "page faults", section="faults"),
)}


@dataclass(frozen=True)
class ExportOptions:
    metric: Metric = METRICS["unfreed"]
    inverted: bool = False  # icicle: roots at the top
    title: str = ""
    build_ids: dict[str, str] = field(default_factory=dict)  # module path -> GNU build id


@dataclass(frozen=True)
class WeightedStack:
    frames: tuple[Frame, ...]  # root first
    value: int
    module_class: str = "unknown"  # the class the value is charged to, as reports say


def metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise UsageError(f"unknown metric {name!r} (one of {', '.join(METRICS)})") from None


def weighted_stacks(snap: Snapshot, which: Metric) -> list[WeightedStack]:
    """One stack per site (allocation, futex waiter or faulting site) with a nonzero
    value, heaviest first."""
    out = [WeightedStack(tuple(reversed(_frames(frames, lost))), value, cls)
           for frames, lost, value, cls in _weighted(snap, which) if value]
    return sorted(out, key=lambda s: -s.value)


def _class(frame: Frame | None) -> str:
    return frame.module_class if frame is not None else "unknown"


def _weighted(snap: Snapshot,
              which: Metric) -> Iterator[tuple[list[Frame], str | None, int, str]]:
    if which.section is not None:
        section = getattr(snap, which.section, None)
        if section is None or getattr(section, "available", True) is False:
            raise UsageError(f"no {which.section} data in this snapshot, so no {which.name} "
                             "flamegraph (it was traced without those probes)")
    if which.name == "futex-wait":
        for lock in snap.locks.locks if snap.locks else []:
            for w in lock.waiters:
                yield w.site.frames, w.site.lost_stack, w.ns, _class(w.site.frame)
    elif which.name == "page-faults":
        for f in snap.faults.sites if snap.faults else []:
            yield f.site.frames, f.site.lost_stack, f.faults, _class(f.site.frame)
    else:
        for site in snap.user_sites():
            yield site.frames, site.lost_stack, site_value(site, which), site.module_class


def site_value(site: Site, which: Metric) -> int:
    if which.name == "unfreed":
        return site.bytes
    if which.name == "allocated":
        return site.alloc_bytes
    if which.name == "allocations":
        return site.allocs
    if which.name == "temporary":
        return site.temp_allocs
    raise UsageError(f"metric {which.name} has no per-site value")


def site_frames(site: Site) -> list[Frame]:
    """The site's frames innermost first; a lost stack becomes one frame saying why."""
    return _frames(site.frames, site.lost_stack)


def _frames(frames: list[Frame], lost: str | None) -> list[Frame]:
    return frames or [Frame(0, symbol=f"[stack not captured: {lost or 'empty stack'}]")]


def function_name(frame: Frame) -> str:
    """A frame's function without the call offset, so one function is one box."""
    if frame.symbol:
        return frame.symbol
    return frame.label()


def module_family(module_class: str) -> str:
    """The colour family of a module class: libpq, addon, node, js, libc or other."""
    if module_class.startswith("addon:"):
        return "addon"
    if module_class in ("libpq", "node", "js", "libc"):
        return module_class
    return "other"
