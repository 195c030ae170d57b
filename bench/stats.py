"""From paired runs to the figures in the table: medians, paired ratios, ns per call."""

from __future__ import annotations

import math
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
    settle_s: float | None  # attached and settled before the hot phase (median)
    hot_cpu_share: float | None  # the tool's CPU during the hot phase / its length (median)
    # geometric mean of the paired ratios and its 95% interval (None: fewer than 2 rounds)
    mean_ratio: float | None
    ratio_interval: tuple[float, float] | None
    # the same of the target's own CPU during the hot phase (the workload's cpu_ns=):
    # what the tool costs the process, without the waits for a CPU a shared machine adds
    cpu_ratio: float | None
    cpu_interval: tuple[float, float] | None
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
        return Summary(0, 0, 0, 0, 0, 0, None, None, None, None, None, None, None, None,
                       None, False, [], None, errors) if errors else None
    ratios = [t.hot_ns / b.hot_ns for b, t in ok]
    per_call = [(t.hot_ns - b.hot_ns) / t.calls for b, t in ok if t.calls]
    traced = [t for _, t in ok]
    attach = [t.attach_s for t in traced if t.attach_s is not None]
    settle = [t.settle_s for t in traced if t.settle_s is not None]
    hot_cpu = [t.hot_cpu_s / (t.hot_ns / 1e9) for t in traced if t.hot_cpu_s is not None]
    mean, interval = ratio_interval(ratios)
    cpu_mean, cpu_interval = ratio_interval([_cpu(t) / _cpu(b) for b, t in ok
                                             if _cpu(t) and _cpu(b)])
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
        settle_s=statistics.median(settle) if settle else None,
        hot_cpu_share=statistics.median(hot_cpu) if hot_cpu else None,
        mean_ratio=mean,
        ratio_interval=interval,
        cpu_ratio=cpu_mean,
        cpu_interval=cpu_interval,
        cpu_s=statistics.median(cpu) if cpu else None,
        rss_mib=max(rss) if rss else None,
        usage_is_tree=any(t.usage_is_tree for t in traced),
        leaks=[t.leak for t in traced if t.leak is not None],
        events_lost=sum(lost) if lost else None,
        errors=errors,
    )


def per_call(pair: Pair, on_cpu: bool = False) -> float | None:
    """The tool's cost per call in one round: (traced - bare) / calls, of the hot phase's
    wall clock or (`on_cpu`) of the workload's own CPU; None if the round failed or the
    workload does not report its CPU."""
    b, t = pair.bare, pair.traced
    if not b or not t or not t.calls:
        return None
    if on_cpu:
        return (_cpu(t) - _cpu(b)) / t.calls if _cpu(t) and _cpu(b) else None
    return (t.hot_ns - b.hot_ns) / t.calls


def per_call_ratios(tool: list[Pair], base: list[Pair], on_cpu: bool = False) -> list[float]:
    """Round by round, the tool's cost per call over the base tool's in the same round
    (the rounds interleave the two, so a slow drift of the machine cancels out)."""
    if len(tool) != len(base):
        return []
    ratios = []
    for t, b in zip(tool, base, strict=True):
        num, den = per_call(t, on_cpu), per_call(b, on_cpu)
        if num is not None and den is not None and num > 0 and den > 0:
            ratios.append(num / den)
    return ratios


def _cpu(run: Run) -> int:
    """The workload's own CPU ns during its hot phase (0: it does not say)."""
    return int(run.fields.get("cpu_ns", 0))


# Student's t, two-sided 95%, by degrees of freedom (1.96 past the table)
_T95 = [12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def ratio_interval(ratios: list[float]) -> tuple[float | None, tuple[float, float] | None]:
    """Geometric mean of paired ratios and its 95% interval (t over the log ratios):
    what tells a 1.01× slowdown from this machine's noise, or says it cannot."""
    if len(ratios) < 2:
        return (ratios[0] if ratios else None), None
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    df = len(logs) - 1
    half = (_T95[df - 1] if df <= len(_T95) else 1.96) * statistics.stdev(logs) / \
        math.sqrt(len(logs))
    return math.exp(mean), (math.exp(mean - half), math.exp(mean + half))
