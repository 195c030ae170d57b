"""Production mode's cost taken apart, in figures this shared, PMU-less VM cannot blur.

    sudo .venv/bin/python -m bench.anatomy [--workloads malloc,sqlite,node] [--rounds N]

A whole-run CPU ratio of the same program swings 0.7-1.4x here between paired runs
(other agents share the 2 vCPUs and their caches), so a 1% or 3% limit is judged on
its parts instead, each counted or measured where it is large:

- instructions (callgrind: deterministic): the workload at its quick size and twice
  that, bare, with the sampler preloaded and dormant, and armed (its semaphores set by
  hand at the gate: sampling, the address set and the USDT sites run, no tracer, no
  trap). The hot phase is the difference of the two sizes; the sampler's own
  instructions (its object's) are the whole of what preloading adds (bare and dormant
  differ by exactly these on a deterministic program).
- allocations: the sampler armed at period 1 counts every allocation of a full-size
  hot phase (and tidy-up); per second of the bare hot phase.
- probe hits (natrace attached in production mode, kernel.bpf_stats_enabled): runs and
  run time of each BPF program over the hot phase, the target's own syscalls (perf's
  raw_syscalls:sys_enter count of the process) and natrace's own CPU while polling.
- the trap (bench/workloads/alloc_fastpath.c, every allocation sampled): the target's
  CPU traced less armed, less the BPF run time, per probe hit.

The traced cost is then composed: the armed path's instructions (as a share of CPU:
an upper bound, as they are simple ones) plus every probe hit at (BPF + trap) plus
the target's syscalls at the raw_syscalls programs' run time (or, where natrace takes
the memory syscalls from libc's syscall sites, those uprobes' hits at BPF + trap), over
the target's CPU.
Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from bench.bpfinfo import ProgInfo
from bench.bpftime import _STATS, held_programs, run_deltas
from bench.procs import Proc, Workload
from bench.tools import NATRACE, sampler_path
from bench.workloads import Workload as Spec
from bench.workloads import build, workloads
from tracer.probes.sampler import SamplerConfig

_SEMAPHORES = ("otel_memory_alloc_semaphore", "otel_memory_free_semaphore")
_TOTAL = re.compile(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS")
_FUNCTION = re.compile(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(?!=>)(.*)\[(.*)\]\s*$")
_TIMEOUT = 900.0
_SITES = ("site_mmap", "site_munmap", "site_mremap", "site_brk")  # bpf/alloc.bpf.c


@dataclass(frozen=True)
class Instructions:
    """Instructions of one hot phase (the difference of two sizes)."""

    total: int
    sampler: int  # the sampler's own (0 bare)

    @property
    def share(self) -> float:
        """The sampler's instructions over everything else the hot phase ran."""
        return self.sampler / (self.total - self.sampler)


def callgrind_counts(report: str, sampler: str) -> tuple[int, int]:
    """(program total, the sampler object's) instructions from `callgrind_annotate
    --inclusive=no` output."""
    total = own = 0
    for line in report.splitlines():
        if m := _TOTAL.match(line):
            total = int(m.group(1).replace(",", ""))
        elif (m := _FUNCTION.match(line)) and os.path.basename(m.group(3)) == sampler:
            own += int(m.group(1).replace(",", ""))
    return total, own


def arm(pid: int, library: Path, period: int | None = None) -> SamplerConfig:
    """Set the sampler's semaphores in `pid` as a tracer's probes would (no probe: the
    USDT sites stay nops), after writing its period."""
    config = SamplerConfig.find(pid, str(library))
    if config is None:
        raise SystemExit(f"process {pid} has no sampler mapped")
    if period:
        config.set_period(period)
    values = [_symbol(library, ".symtab", n) for n in _SEMAPHORES]
    base = config.address - _symbol(library, ".dynsym", "natrace_sampler")
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for value in values:
            mem.seek(base + value)
            mem.write(struct.pack("<H", 1))
    return config


def _symbol(library: Path, section: str, name: str) -> int:
    with open(library, "rb") as fh:
        table = ELFFile(fh).get_section_by_name(section)
        return int(table.get_symbol_by_name(name)[0]["st_value"])  # type: ignore[union-attr]


def gated_run(argv: list[str], mode: str, period: int | None = None) -> tuple[Workload, int]:
    """Run a workload through its hot phase in `mode` (bare, dormant, armed); (the
    finished workload, what its sampler counted: 0 unless armed)."""
    lib = sampler_path()
    wp = Workload(argv, None if mode == "bare" else {"LD_PRELOAD": str(lib)})
    try:
        _, pid = wp.ready(_TIMEOUT)
        config = arm(pid, lib, period) if mode == "armed" else None
        wp.go()
        wp.hot(_TIMEOUT)
        counted = config.read() if config is not None else None
        usage = wp.finish(_TIMEOUT)
        if usage.exit_code != 0:
            raise SystemExit(f"{argv[0]} exited {usage.exit_code}: {wp.err.tail()}")
        return wp, counted.sampled if counted is not None else 0
    finally:
        wp.kill()


def instructions(small: list[str], big: list[str], mode: str) -> Instructions:
    """The hot phase's instructions: the workload run at two sizes under callgrind."""
    counts = []
    for argv in (small, big):
        with tempfile.TemporaryDirectory(prefix="natrace-anatomy-") as tmp:
            out = Path(tmp) / "callgrind.out"
            gated_run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                       *argv], mode)
            report = subprocess.run(["callgrind_annotate", "--inclusive=no",
                                     "--threshold=100", str(out)],
                                    capture_output=True, text=True, check=True).stdout
        counts.append(callgrind_counts(report, sampler_path().name))
    (t1, s1), (t2, s2) = counts
    return Instructions(t2 - t1, s2 - s1)


@dataclass(frozen=True)
class Traced:
    """One hot phase with natrace attached in production mode."""

    hot_s: float
    target_cpu_s: float
    natrace_cpu_s: float
    syscalls: int | None  # the target's own (None: no perf here)
    programs: dict[str, tuple[int, int]]  # BPF program name -> (runs, run ns)

    def runs(self, name: str) -> int:
        return self.programs.get(name, (0, 0))[0]

    def ns_per_run(self, name: str) -> float:
        runs, ns = self.programs.get(name, (0, 0))
        return ns / runs if runs else 0.0


def traced(argv: list[str], natrace_args: list[str], natrace: str = NATRACE) -> Traced:
    """One hot phase with `natrace snapshot -p` attached and settled. The syscalls are
    counted from just before the gate to the idle line (the tidy-up makes few)."""
    lib = sampler_path()
    wp = Workload(argv, {"LD_PRELOAD": str(lib)})
    nat = perf = None
    try:
        _, pid = wp.ready(_TIMEOUT)
        with tempfile.TemporaryDirectory(prefix="natrace-anatomy-") as tmp:
            nat = Proc([natrace, "snapshot", "-p", str(pid), "--duration", "24h", "--json",
                        "-o", f"{tmp}/report.json", *natrace_args])
            nat.err.wait_for("natrace: attached to", 300)
            nat.wait_idle(0.02, 0.5, 60)
            if shutil.which("perf"):
                perf = Proc(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p",
                             str(pid)])
                time.sleep(0.5)  # its counter open before the gate
            before, cpu0 = held_programs(nat.pid), nat.cpu_s()
            wp.go()
            hot_ns, _calls = wp.hot(_TIMEOUT)
            after, cpu1 = held_programs(nat.pid), nat.cpu_s()
            syscalls = _perf_count(perf) if perf is not None else None
            nat.signal(signal.SIGINT)
            nat.reap(120)
        wp.finish(_TIMEOUT)
    finally:
        for p in (perf, nat, wp):
            if p is not None:
                p.kill()
    return Traced(hot_ns / 1e9, int(wp.hot_fields["cpu_ns"]) / 1e9, cpu1 - cpu0, syscalls,
                  _by_name(before, after))


def _perf_count(perf: Proc) -> int | None:
    perf.signal(signal.SIGINT)
    _t, line = perf.err.wait_for("raw_syscalls:sys_enter", 10)
    perf.reap(10)
    count = line.split(",")[0]
    return int(count) if count.isdigit() else None


def _by_name(before: dict[int, ProgInfo],
             after: dict[int, ProgInfo]) -> dict[str, tuple[int, int]]:
    """Runs and run ns by program name (a name held twice: summed)."""
    out: dict[str, tuple[int, int]] = {}
    for p, runs, ns in run_deltas(before, after):
        r, n = out.get(p.name, (0, 0))
        out[p.name] = (r + runs, n + ns)
    return out


def trap_ns(rounds: int, natrace: str = NATRACE) -> float:
    """ns a probe hit costs the process beyond its BPF run time (the uprobe trap on a
    USDT nop): every allocation of alloc_fastpath sampled, traced against armed."""
    argv = [str(build() / "alloc_fastpath"), "200", "64"]
    found = []
    for _ in range(rounds):
        armed, _n = gated_run(argv, "armed", period=1)
        t = traced(argv, ["--sample", "1"], natrace)
        hits = t.runs("otel_alloc") + t.runs("free_enter")
        bpf = sum(ns for name, (_r, ns) in t.programs.items() if name in ("otel_alloc",
                                                                          "free_enter"))
        cpu = t.target_cpu_s - int(armed.hot_fields["cpu_ns"]) / 1e9
        found.append((cpu * 1e9 - bpf) / hits)
    return statistics.median(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anatomy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="malloc,sqlite,node")
    parser.add_argument("--rounds", type=int, default=3,
                        help="traced hot phases per workload and trap measurements (medians)")
    parser.add_argument("--natrace-args", default="",
                        help="extra arguments for natrace snapshot (e.g. '--sample 2M')")
    parser.add_argument("--natrace", default=NATRACE,
                        help="the natrace to attach (default this tree's): another "
                             "checkout's, for a before/after")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.anatomy: needs root (BPF)", file=sys.stderr)
        return 2
    if not shutil.which("valgrind") or not sampler_path().is_file():
        print("python -m bench.anatomy: needs valgrind and the built sampler "
              "(scripts/provision.sh)", file=sys.stderr)
        return 2
    build()
    quick, full = workloads(True), workloads(False)
    doubled = workloads(True, 2)
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in full]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}")
    was = _STATS.read_text().strip()
    _STATS.write_text("1")
    load0 = os.getloadavg()
    try:
        trap = trap_ns(args.rounds, args.natrace)
        rows = [_workload(n, quick[n], doubled[n], full[n], args) for n in names]
    finally:
        _STATS.write_text(was)
    load1 = os.getloadavg()
    out = [f"- command: `python -m bench.anatomy {' '.join(argv or sys.argv[1:])}`; "
           f"loadavg {load0[0]:.2f} -> {load1[0]:.2f}",
           f"- trap per probe hit (USDT nop, beyond BPF; median of {args.rounds}): "
           f"{trap:,.0f} ns", "",
           "| workload | instructions per hot op, bare | sampler dormant: its instructions "
           "(share) | armed (share) | allocations/s | alloc hits/s | BPF ns per alloc hit | "
           "free hits/s | BPF ns per free hit | target syscalls/s | ns per syscall (enter + "
           "exit) | syscall-site hits/s | BPF ns per site hit | natrace CPU while hot | "
           "composed traced cost |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in zip(names, rows):
        out.append(_row(name, row, trap))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


@dataclass(frozen=True)
class _Row:
    ops: int
    bare: Instructions
    dormant: Instructions
    armed: Instructions
    allocs: int
    bare_hot_s: float
    traced: list[Traced]


def _workload(name: str, quick: Spec, doubled: Spec, full: Spec,
              args: argparse.Namespace) -> _Row:
    print(f"{name}: instructions", file=sys.stderr, flush=True)
    ops = _ops(quick, doubled)
    bare_i, dormant_i, armed_i = (instructions(list(quick.argv), list(doubled.argv), mode)
                                  for mode in ("bare", "dormant", "armed"))
    print(f"{name}: allocations and probe hits", file=sys.stderr, flush=True)
    bare, _n = gated_run(list(full.argv), "bare")
    _armed, allocs = gated_run(list(full.argv), "armed", period=1)
    runs = [traced(list(full.argv), args.natrace_args.split(), args.natrace)
            for _ in range(args.rounds)]
    return _Row(ops, bare_i, dormant_i, armed_i, allocs, int(bare.hot_fields["hot_ns"]) / 1e9, runs)


def _ops(quick: Spec, doubled: Spec) -> int:
    """Operations (the workload's `calls`) of the hot-phase difference."""
    counts = []
    for s in (quick, doubled):
        wp, _n = gated_run(list(s.argv), "bare")
        counts.append(int(wp.hot_fields["calls"]))
    return counts[1] - counts[0]


def _row(name: str, r: _Row, trap: float) -> str:
    def med(f: Callable[[Traced], float]) -> float:
        return statistics.median(f(t) for t in r.traced)

    alloc_hits = med(lambda t: t.runs("otel_alloc") / t.hot_s)
    free_hits = med(lambda t: t.runs("free_enter") / t.hot_s)
    alloc_ns = med(lambda t: t.ns_per_run("otel_alloc"))
    free_ns = med(lambda t: t.ns_per_run("free_enter"))
    known = [t.syscalls / t.hot_s for t in r.traced if t.syscalls is not None]
    syscalls = statistics.median(known) if known else None
    sys_ns = med(lambda t: t.ns_per_run("sys_enter") + t.ns_per_run("sys_exit"))
    # without raw_syscalls: the memory syscalls' uprobes at libc's syscall sites (a
    # single-stepped instruction: its trap costs more than the USDT nop's `trap`)
    site_hits = med(lambda t: sum(t.runs(n) for n in _SITES) / t.hot_s)
    site_ns = med(lambda t: sum(t.programs.get(n, (0, 0))[1] for n in _SITES)
                  / max(sum(t.runs(n) for n in _SITES), 1))
    natrace = med(lambda t: t.natrace_cpu_s / t.hot_s)
    cpu_per_s = med(lambda t: t.target_cpu_s / t.hot_s)  # CPUs the target keeps busy
    per_s = (alloc_hits * (alloc_ns + trap) + free_hits * (free_ns + trap)
             + (syscalls or 0) * sys_ns + site_hits * (site_ns + trap)) / 1e9
    composed = r.armed.share + per_s / cpu_per_s
    return (f"| {name} | {r.bare.total / r.ops:,.0f} | {r.dormant.sampler / r.ops:,.1f} "
            f"({r.dormant.share:.2%}) | {r.armed.sampler / r.ops:,.1f} ({r.armed.share:.2%}) "
            f"| {r.allocs / r.bare_hot_s:,.0f} | {alloc_hits:,.0f} | {alloc_ns:,.0f} | "
            f"{free_hits:,.0f} | {free_ns:,.0f} | "
            f"{'n/a' if syscalls is None else f'{syscalls:,.0f}'} | {sys_ns:,.0f} | "
            f"{site_hits:,.0f} | {site_ns:,.0f} | "
            f"{natrace:.2%} | {composed:.2%} |")


if __name__ == "__main__":
    sys.exit(main())
