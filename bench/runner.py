"""Rounds of paired runs: for each workload and tool, a bare run right before the
tool's run, so slow drift of a shared machine cancels out of each ratio."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.procs import BenchError, adopt_orphans, reap_orphans
from bench.stats import Pair
from bench.tools import Bare, Run, Tool
from bench.workloads import Workload

Results = dict[str, dict[str, list[Pair]]]  # workload -> tool -> pairs


def _once(tool: Tool, spec: Workload) -> Run:
    with tempfile.TemporaryDirectory(prefix="natrace-bench-") as scratch:
        try:
            return tool.run(spec, Path(scratch))
        finally:
            reap_orphans()  # its probes gone before the next tool attaches


def measure(specs: list[Workload], tools: list[Tool], rounds: int,
            log: Callable[[str], None]) -> Results:
    bare = Bare()
    adopt_orphans()
    results: Results = {}
    for spec in specs:
        per_tool = results.setdefault(spec.name, {bare.name: []})
        for r in range(1, rounds + 1):
            # every other round in reverse order (A B C, C B A, ...): a drift of the
            # machine over a round weighs on no tool more than another
            for tool in tools if r % 2 else tools[::-1]:
                if not tool.applies(spec) or tool.unavailable():
                    continue
                pair = Pair(None, None)
                try:
                    pair.bare = _once(bare, spec)
                    per_tool[bare.name].append(Pair(pair.bare, pair.bare))
                    pair.traced = _once(tool, spec)
                except (BenchError, OSError, ValueError, KeyError) as err:
                    pair.error = f"{type(err).__name__}: {err}"
                per_tool.setdefault(tool.name, []).append(pair)
                log(f"[{spec.name} {r}/{rounds}] {tool.name}: " + _describe(pair))
    return results


def _describe(pair: Pair) -> str:
    if pair.error or not pair.bare or not pair.traced:
        return f"FAILED {pair.error}"
    ratio = pair.traced.hot_ns / pair.bare.hot_ns
    return f"{pair.traced.hot_ns / 1e9:.3f} s vs bare {pair.bare.hot_ns / 1e9:.3f} s (x{ratio:.2f})"
