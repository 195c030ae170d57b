"""The benchmark's output: one Markdown table per workload, the targets of issue 5
checked against them (reported, never asserted), and the throughput ladder."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from bench.runner import Results
from bench.stats import Pair, Summary, per_call_ratios, ratio_interval, summarize
from bench.throughput import Step, highest_lossless
from bench.tools import Tool
from bench.workloads import Leak, Workload

COLUMNS = ["tool", "rounds", "hot s (median)", "slowdown median (min–max)",
           "slowdown geometric mean (95% interval)",
           "target CPU ratio geometric mean (95% interval)", "ns/call overhead", "attach s",
           "settle s", "tool CPU while hot", "tool CPU s", "tool peak RSS MiB",
           "leak reported: blocks / bytes", "events lost"]
NA = "n/a"
NONE = "—"

# Targets of issue 5, as (label, limit).
FLOOR_RATIO = 1.25
MEMLEAK_RATIO = 1 / 3
TRIAGE_SLOWDOWN = 1.05
RSS_MIB = 150.0
ATTACH_S = 2.0
# issue 20: the in-process sampler traced / dormant, on the pathological loop and on
# programs that work between allocations
IN_PROCESS = {"malloc": (1.30, 1.10), "node": (1.03, 1.01), "sqlite": (1.03, 1.01)}
# Issue 21's, from the paired runs (bench/latency.py has its waits and memory by mode).
PER_CALL_RATIO = 1.2
RSS_MARGIN_MIB = 15.0


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _leak_cell(tool: Tool, leak: Leak | None, s: Summary) -> str:
    if leak is None or not tool.reports_leaks:
        return NONE
    if not s.leaks:
        return NA
    cells = []
    for blocks, size in dict.fromkeys(s.leaks):  # distinct figures, in round order
        verdict = "exact" if (blocks, size) == (leak.blocks, leak.bytes) else \
            f"{size / leak.bytes:.2f}× truth"
        cells.append(f"{blocks:,} / {size:,} B ({verdict})")
    return "; ".join(cells)


def _mean_cell(mean: float | None, interval: tuple[float, float] | None) -> str:
    if mean is None:
        return NA
    if interval is None:
        return f"{mean:.3f}×"
    low, high = interval
    return f"{mean:.3f}× ({low:.3f}–{high:.3f})"


def _summary_cells(tool: Tool, spec: Workload, s: Summary) -> list[str]:
    if s.rounds == 0:
        return [tool.name, "0", f"failed: {s.errors[0][:80]}"] + [NA] * (len(COLUMNS) - 3)
    tree = "†" if s.usage_is_tree else ""
    return [
        tool.name,
        str(s.rounds) + (f" ({len(s.errors)} failed)" if s.errors else ""),
        f"{s.hot_s:.3f}",
        f"{s.slowdown:.2f}× ({s.slowdown_min:.2f}–{s.slowdown_max:.2f})",
        _mean_cell(s.mean_ratio, s.ratio_interval),
        _mean_cell(s.cpu_ratio, s.cpu_interval),
        f"{s.ns_per_call:,.0f}",
        NONE if s.attach_s is None else f"{s.attach_s:.2f}",
        NONE if s.settle_s is None else f"{s.settle_s:.2f}",
        NONE if s.hot_cpu_share is None else f"{s.hot_cpu_share:.1%}",
        NONE if s.cpu_s is None else f"{s.cpu_s:.2f}{tree}",
        NONE if s.rss_mib is None else f"{s.rss_mib:.0f}{tree}",
        _leak_cell(tool, spec.leak, s),
        NONE if s.events_lost is None else f"{s.events_lost:,}",
    ]


def workload_table(spec: Workload, tools: list[Tool], results: Results) -> list[str]:
    per_tool = results.get(spec.name, {})
    truth = (f"; truth: {spec.leak.blocks:,} blocks / {spec.leak.bytes:,} B from "
             f"{spec.leak.function}()" if spec.leak else "")
    lines = [f"### {spec.name}: `{' '.join(spec.argv)}`", "",
             f"One call = one {spec.op}{truth}.", "",
             _row(COLUMNS), _row(["---"] * len(COLUMNS))]
    notes = []
    for tool in tools:
        if not tool.applies(spec):
            notes.append(f"{tool.name}: not run on this workload")
            continue
        reason = tool.unavailable()
        if reason:
            lines.append(_row([tool.name] + [NA] * (len(COLUMNS) - 1)))
            notes.append(f"{tool.name}: n/a ({reason})")
            continue
        s = summarize(per_tool.get(tool.name, []))
        if s is None:
            lines.append(_row([tool.name] + [NA] * (len(COLUMNS) - 1)))
            continue
        lines.append(_row(_summary_cells(tool, spec, s)))
    lines.append("")
    lines += [f"- {n}" for n in notes]
    return lines


def _slowdown(results: Results, workload: str, tool: str) -> float | None:
    s = summarize(results.get(workload, {}).get(tool, []))
    return s.slowdown if s and s.rounds else None


class _Checks:
    """Rows of a targets table: figure, limit, met or missed (and by how much)."""

    def __init__(self) -> None:
        self.lines = ["| target | measured | limit | verdict |", "|---|---|---|---|"]

    def __call__(self, label: str, value: float | None, limit: float | None,
                 fmt: str) -> None:
        if value is None or limit is None:
            shown = NA if limit is None else fmt.format(limit)
            self.lines.append(f"| {label} | {NA} | {shown} | not measured |")
            return
        verdict = "met" if value <= limit else f"missed by {value / limit:.2f}×"
        self.lines.append(f"| {label} | {fmt.format(value)} | {fmt.format(limit)} | "
                          f"{verdict} |")


def _interval_check(label: str, s: Summary | None, limit: float) -> str:
    """A slowdown target judged on the 95% interval of the paired ratios' geometric
    mean — of the target's own CPU when the workload reports it (a shared machine's
    waits for a CPU are noise, not the tool's cost), else of the wall-clock hot phase:
    met when all of it is within the limit, missed when all of it is past it, otherwise
    not told apart from the noise by this many rounds."""
    if s is None or s.mean_ratio is None:
        return f"| {label} | {NA} | {limit:.3f}× | not measured |"
    on_cpu = s.cpu_ratio is not None
    mean = s.cpu_ratio if s.cpu_ratio is not None else s.mean_ratio
    low, high = (s.cpu_interval if on_cpu else s.ratio_interval) or (mean, mean)
    shown = (f"{'CPU' if on_cpu else 'wall'} {mean:.3f}× ({low:.3f}–{high:.3f}, "
             f"{s.rounds} rounds)" + (f"; wall {s.mean_ratio:.3f}×" if on_cpu else ""))
    if high <= limit:
        verdict = "met"
    elif low > limit:
        verdict = f"missed by {mean / limit:.2f}×"
    else:
        verdict = "not resolved: the interval straddles the limit"
    return f"| {label} | {shown} | {limit:.3f}× | {verdict} |"


def _summary(results: Results, workload: str, tool: str) -> Summary | None:
    s = summarize(results.get(workload, {}).get(tool, []))
    return s if s and s.rounds else None


def per_call_check(label: str, tool: list[Pair], base: list[Pair], limit: float) -> str:
    """A per-call target judged on the rounds' paired ratios (the tool's ns per call over
    the base's in the same round, wall clock): the 95% interval of their geometric mean
    met when all of it is within the limit, missed when all of it is past it, otherwise
    not resolved by this many rounds. The rounds' median and spread, and the same on the
    workload's own CPU, are shown beside."""
    wall = per_call_ratios(tool, base)
    if not wall:
        return f"| {label} | {NA} | {limit:.2f}× | not measured |"
    mean, interval = ratio_interval(wall)
    assert mean is not None
    low, high = interval or (mean, mean)
    shown = (f"**{statistics.median(wall):.2f}×** median of {len(wall)} rounds "
             f"(spread {min(wall):.2f}–{max(wall):.2f}; geometric mean {mean:.2f}×, "
             f"95% {low:.2f}–{high:.2f})")
    cpu = per_call_ratios(tool, base, on_cpu=True)
    if cpu:
        shown += (f"; on the workload's CPU {statistics.median(cpu):.2f}× "
                  f"({min(cpu):.2f}–{max(cpu):.2f})")
    if high <= limit:
        verdict = "met"
    elif low > limit:
        verdict = f"missed by {mean / limit:.2f}×"
    else:
        side = "within" if statistics.median(wall) <= limit else "past"
        verdict = f"not resolved: the interval straddles the limit (median {side} it)"
    return f"| {label} | {shown} | {limit:.2f}× | {verdict} |"


# Issue 21's per-call comparisons, as (label, tool, base): each mode of full tracing
# against the empty-probe floor with the same kernel hooks. With triage natrace holds a
# raw_syscalls program per direction, and since Linux 6.11 each uretprobe returns
# through a syscall, which then takes the kernel's traced-syscall path (~250 ns a call
# that is not natrace's BPF); the floor + raw_syscalls holds an empty pair of its own.
# The plain full / floor ratio (that path counted against natrace) is shown too.
PER_CALL = [
    ("full (triage) / floor + raw_syscalls: like-for-like hooks", "natrace full",
     "empty-probe floor + raw_syscalls"),
    ("full --no-triage / empty-probe floor: like-for-like hooks", "natrace full --no-triage",
     "empty-probe floor"),
    ("full (triage) / empty-probe floor (information: counts the traced-syscall path "
     "against natrace)", "natrace full", "empty-probe floor"),
]


def targets_21(results: Results, specs: list[Workload]) -> list[str]:
    """Issue 21's targets that the paired runs measure: full tracing's cost per call
    against the empty-probe floor's (round by round, each mode against the floor with
    the same hooks), its 2-thread scaling against the floor's, and natrace's peak RSS
    against the floor's + 15 MiB."""
    check = _Checks()
    names = [s.name for s in specs]

    def per_call(workload: str, tool: str) -> float | None:
        s = _summary(results, workload, tool)
        return s.ns_per_call if s and s.ns_per_call > 0 else None

    for w in (n for n in names if n.startswith("malloc")):
        runs = results.get(w, {})
        for label, tool, base in PER_CALL:
            if tool in runs and base in runs:
                check.lines.append(per_call_check(f"{w}: ns/call, {label}", runs[tool],
                                                  runs[base], PER_CALL_RATIO))
    if "malloc" in names and "malloc-2t" in names:
        for tool, base in dict.fromkeys((t, b) for _, t, b in PER_CALL):
            t2, t1 = per_call("malloc-2t", tool), per_call("malloc", tool)
            b2, b1 = per_call("malloc-2t", base), per_call("malloc", base)
            if t2 and t1 and b2 and b1:
                check(f"2 threads vs 1: {tool}'s ns/call ratio / {base}'s",
                      (t2 / t1) / (b2 / b1), PER_CALL_RATIO, "{:.2f}")
    rss = {name: [s.rss_mib for w in names if (s := _summary(results, w, name))
                  and s.rss_mib is not None]
           for name in {t for w in results.values() for t in w}}
    floor_rss = max(rss.get("empty-probe floor", []), default=None)
    natrace_rss = max((v for name, vals in rss.items() if name.startswith("natrace")
                       for v in vals), default=None)
    check("natrace peak RSS, any workload and mode (MiB)", natrace_rss,
          floor_rss + RSS_MARGIN_MIB if floor_rss else None, "{:.0f}")
    return check.lines


def targets(results: Results, specs: list[Workload]) -> list[str]:
    """Issues 5's and 20's targets against this run: figure, limit, met or missed (and by
    how much)."""
    check = _Checks()
    lines = check.lines

    names = [s.name for s in specs]
    for w in (n for n in names if n.startswith("malloc")):
        full = _slowdown(results, w, "natrace full")
        floor = _slowdown(results, w, "empty-probe floor")
        memleak = _slowdown(results, w, "memleak-bpfcc")
        check(f"{w}: full slowdown / empty-probe floor's",
              full / floor if full and floor else None, FLOOR_RATIO, "{:.2f}")
        check(f"{w}: full slowdown / memleak-bpfcc's",
              full / memleak if full and memleak else None, MEMLEAK_RATIO, "{:.2f}")
    for w in (n for n in names if n.startswith(("malloc", "futex"))):
        check(f"{w}: triage slowdown", _slowdown(results, w, "natrace triage"),
              TRIAGE_SLOWDOWN, "{:.3f}×")
    for w in names:
        limits = IN_PROCESS.get(w.split("-", 1)[0])
        if limits:
            for tool, limit in (("natrace in-process 512K", limits[0]),
                                ("sampler dormant", limits[1])):
                lines.append(_interval_check(f"{w}: {tool}", _summary(results, w, tool), limit))
    natrace = [s for w in results.values() for name, pairs in w.items()
               if name.startswith("natrace") and (s := summarize(pairs)) and s.rounds]
    check("natrace peak RSS, any workload and mode",
          max((s.rss_mib for s in natrace if s.rss_mib is not None), default=None),
          RSS_MIB, "{:.0f} MiB")
    check("natrace attach (median), slowest workload and mode",
          max((s.attach_s for s in natrace if s.attach_s is not None), default=None),
          ATTACH_S, "{:.2f} s")
    lost = [s.events_lost for s in natrace if s.events_lost is not None]
    check("streamed events lost on the workloads", sum(lost) if lost else None, 0, "{:,}")
    return lines


def throughput_table(steps: list[Step]) -> list[str]:
    lines = ["| paced to events/s | events | reached events/s | events lost | "
             "natrace CPU s |", "|---|---|---|---|---|"]
    for s in steps:
        pace = f"{s.target_rate:,.0f}" if s.target_rate else "unpaced"
        if s.error:
            lines.append(f"| {pace} | failed: {s.error[:60]} | | | |")
            continue
        lost = NA if s.events_lost is None else f"{s.events_lost:,}"
        lost += f" ({s.events_lost / s.events:.1%})" if s.events and s.events_lost else ""
        cpu = NONE if s.natrace_cpu_s is None else f"{s.natrace_cpu_s:.2f}"
        lines.append(f"| {pace} | {s.events:,} | {s.rate:,.0f} | {lost} | {cpu} |")
    best = highest_lossless(steps)
    lines.append("")
    lines.append("Highest rate with zero loss: " +
                 (f"{best.rate:,.0f} events/s" if best else "none of the steps"))
    return lines
