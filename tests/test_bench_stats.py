"""The benchmark's statistics (bench/stats.py, bench/report.py): the paired ratios'
geometric mean and 95% interval, and a target judged on that interval."""

from __future__ import annotations

import math

import pytest

from bench.report import _interval_check, per_call_check
from bench.stats import Pair, per_call_ratios, ratio_interval, summarize
from bench.tools import Run


def test_ratio_interval_is_t_over_the_log_ratios() -> None:
    mean, interval = ratio_interval([1.0, 1.02, 1.04])
    logs = [math.log(x) for x in (1.0, 1.02, 1.04)]
    m = sum(logs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / 2)
    assert mean == pytest.approx(math.exp(m))
    assert interval == pytest.approx((math.exp(m - 4.303 * sd / math.sqrt(3)),
                                      math.exp(m + 4.303 * sd / math.sqrt(3))))
    assert ratio_interval([1.5]) == (1.5, None)
    assert ratio_interval([]) == (None, None)


def _pairs(ratios: list[float], cpu: list[float] | None = None) -> list[Pair]:
    """Paired runs with these wall-clock ratios (and, given, these CPU ratios)."""
    def run(wall: float, cpu_s: float | None) -> Run:
        fields = {} if cpu_s is None else {"cpu_ns": str(round(cpu_s * 1e9))}
        return Run(round(wall * 1e9), 10, fields=fields)
    return [Pair(run(1.0, None if cpu is None else 1.0),
                 run(r, None if cpu is None else cpu[i])) for i, r in enumerate(ratios)]


@pytest.mark.parametrize("ratios, verdict", [
    ([1.001, 1.003, 0.999, 1.002, 1.000, 1.001], "met"),
    ([1.05, 1.06, 1.04, 1.05, 1.07], "missed by 1.04×"),
    ([0.97, 1.05, 0.99, 1.04], "not resolved: the interval straddles the limit"),
])
def test_a_target_is_met_missed_or_unresolved_by_its_interval(ratios: list[float],
                                                              verdict: str) -> None:
    row = _interval_check("node: sampler dormant", summarize(_pairs(ratios)), 1.01)
    assert row.endswith(f"| 1.010× | {verdict} |"), row
    assert f"{len(ratios)} rounds" in row


def test_the_target_cpu_decides_when_the_workload_reports_it() -> None:
    """Wall-clock ratios scattered by a busy machine, the process's own CPU steady."""
    wall = [0.9, 1.2, 1.0, 1.15, 0.95]
    row = _interval_check("sqlite: sampler dormant",
                          summarize(_pairs(wall, [1.002, 1.004, 1.001, 1.003, 1.002])), 1.01)
    assert "| CPU 1.002× (" in row and "; wall " in row and row.endswith("| met |"), row


def _per_call_pairs(ns: list[float], calls: int = 1000) -> list[Pair]:
    """Rounds whose tool costs these ns per call over a bare hot phase of 1 s."""
    return [Pair(Run(10**9, calls), Run(10**9 + round(n * calls), calls)) for n in ns]


def test_per_call_is_judged_round_by_round_against_its_base() -> None:
    """Round r's ns/call over the base's in round r: a drift that moves both alike
    (here 1,000 -> 1,500 ns for the base) leaves the ratio alone."""
    base = _per_call_pairs([1000, 1200, 1500, 1100, 1300])
    tool = _per_call_pairs([1100, 1320, 1650, 1210, 1430])
    assert per_call_ratios(tool, base) == pytest.approx([1.1] * 5)
    row = per_call_check("malloc: full / floor", tool, base, 1.2)
    assert "**1.10×** median of 5 rounds (spread 1.10–1.10" in row, row
    assert row.endswith("| 1.20× | met |"), row
    over = _per_call_pairs([1300, 1560, 1950, 1430, 1690])
    assert per_call_check("x", over, base, 1.2).endswith("| missed by 1.08× |")
    scattered = _per_call_pairs([1000, 1560, 1500, 1430, 1300])
    assert per_call_check("x", scattered, base, 1.2).endswith(
        "| not resolved: the interval straddles the limit (median within it) |")
    assert per_call_check("x", tool, base[:4], 1.2).endswith("| not measured |")
