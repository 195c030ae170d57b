"""From paired runs to the figures in the table: medians, paired ratios, ns per call."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.tools import Run


@dataclass
class Pair:
    """A tool's run and the bare run made right before it (error: the run failed)."""

    bare: Run | None
    traced: Run | None
    error: str | None = None


@dataclass(frozen=True)
class Summary:
    rounds: int
    hot_s: float
    slowdown: float
    slowdown_min: float
    slowdown_max: float
    ns_per_call: float
    attach_s: float | None
    cpu_s: float | None
    rss_mib: float | None
    usage_is_tree: bool
    leaks: list[tuple[int, int]]
    events_lost: int | None
    errors: list[str]


def summarize(pairs: list[Pair]) -> Summary | None:
    """None when no round completed."""
    ok = [(p.bare, p.traced) for p in pairs if p.bare and p.traced]
    errors = [p.error for p in pairs if p.error]
    if not ok:
        return Summary(0, 0, 0, 0, 0, 0, None, None, None, False, [], None, errors) \
            if errors else None
    ratios = [t.hot_ns / b.hot_ns for b, t in ok]
    per_call = [(t.hot_ns - b.hot_ns) / t.calls for b, t in ok if t.calls]
    traced = [t for _, t in ok]
    attach = [t.attach_s for t in traced if t.attach_s is not None]
    cpu = [t.usage.cpu_s for t in traced if t.usage]
    rss = [t.usage.max_rss_mib for t in traced if t.usage]
    lost = [t.events_lost for t in traced if t.events_lost is not None]
    return Summary(
        rounds=len(ok),
        hot_s=statistics.median(t.hot_ns for t in traced) / 1e9,
        slowdown=statistics.median(ratios),
        slowdown_min=min(ratios),
        slowdown_max=max(ratios),
        ns_per_call=statistics.median(per_call) if per_call else 0.0,
        attach_s=statistics.median(attach) if attach else None,
        cpu_s=statistics.median(cpu) if cpu else None,
        rss_mib=max(rss) if rss else None,
        usage_is_tree=any(t.usage_is_tree for t in traced),
        leaks=[t.leak for t in traced if t.leak is not None],
        events_lost=sum(lost) if lost else None,
        errors=errors,
    )
