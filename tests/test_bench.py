"""Smoke test of the benchmark runner (bench/): `python -m bench --quick` on the
smallest malloc workload, real tools, output checked for completeness only (no
timing assertions: this machine is shared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parent.parent


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """Body rows of the first table after `heading`, as lists of cells."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    table = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        table.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return table[2:]  # without header and separator


def test_quick_run_prints_every_column_for_every_tool() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workloads", "malloc"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for fact in ("- command:", "- date:", "- machine:", "- loadavg"):
        assert fact in out
    rows = table_rows(out, "### malloc:")
    tools = {r[0]: r for r in rows}
    assert set(tools) >= {"bare", "natrace full", "natrace sampled 512K", "natrace triage",
                          "empty-probe floor", "floor, free at +0",
                          "empty-probe floor + raw_syscalls", "memleak-bpfcc",
                          "heaptrack", "valgrind memcheck", "natrace in-process 512K",
                          "sampler dormant"}
    for row in rows:
        assert len(row) == 14 and all(row), row
        assert not any(c.startswith("failed") for c in row), row
    for name in ("natrace full", "heaptrack", "valgrind memcheck"):
        assert "exact" in tools[name][12], tools[name]  # leak figure against the truth
    assert "events lost" in out
    # production mode: natrace settled before the hot phase, its CPU meanwhile measured
    settle, hot_cpu = tools["natrace in-process 512K"][8:10]
    assert float(settle) >= 0 and hot_cpu.endswith("%"), tools["natrace in-process 512K"]
    assert tools["sampler dormant"][5].endswith("×"), tools["sampler dormant"]  # CPU ratio
    targets = table_rows(out, "### Targets")
    assert targets and all(len(r) == 4 and r[3] for r in targets)
    steps = table_rows(out, "### Event-pipeline throughput")
    assert len(steps) == 2 and all(len(r) == 5 for r in steps)
    assert "Highest rate with zero loss:" in out


def test_bpftime_counts_each_probe_run_of_the_hot_phase() -> None:
    """`python -m bench.bpftime`: every malloc of the hot phase (pairs plus leaks) is one
    run of alloc_return and of malloc_enter, the kernel's counts exactly."""
    was = Path("/proc/sys/kernel/bpf_stats_enabled").read_text()
    proc = subprocess.run([sys.executable, "-m", "bench.bpftime", "--pairs", "20000"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "over 40,100 calls" in proc.stdout, proc.stdout
    runs = {r[0]: r[1] for r in table_rows(proc.stdout, " calls\n")}
    assert runs["alloc_return"] == runs["malloc_enter"] == "20,100", runs
    assert "all uprobe programs" in runs
    assert Path("/proc/sys/kernel/bpf_stats_enabled").read_text() == was


def test_syscalls_reports_one_raw_syscalls_program_per_direction() -> None:
    """`python -m bench.syscalls`: natrace attached elsewhere (allocations and triage)
    holds one sys_enter and one sys_exit link; each figure of the table is there."""
    proc = subprocess.run([sys.executable, "-m", "bench.syscalls", "--rounds", "1",
                           "--runs", "1", "--calls", "10000"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("raw tracepoint links natrace held: page_fault_user 1, sched_process_exec 3, "
            "sched_process_exit 1, sched_process_fork 1, sys_enter 1, sys_exit 1\n"
            ) in proc.stdout, proc.stdout
    rows = [r[0] for r in table_rows(proc.stdout, "held:")]
    assert rows == ["bare", "natrace attached elsewhere", "added per syscall"], rows


def test_anatomy_counts_what_preloading_adds_and_every_allocation() -> None:
    """bench.anatomy's two deterministic figures on malloc_heavy: preloading the dormant
    sampler adds exactly its own instructions to the hot phase (callgrind, two sizes),
    and the sampler armed at period 1 counts every allocation of the hot phase."""
    from bench import anatomy
    from bench.workloads import build

    prog = str(build() / "malloc_heavy")
    small, big = [prog, "20000", "100", "1"], [prog, "40000", "100", "1"]
    bare = anatomy.instructions(small, big, "bare")
    dormant = anatomy.instructions(small, big, "dormant")
    assert bare.sampler == 0 and dormant.sampler > 0
    # the same to a few instructions of the clock's retry loop (vDSO clock_gettime)
    assert abs(dormant.total - dormant.sampler - bare.total) < 100, (bare, dormant)
    assert dormant.sampler == 160_000  # 20,000 mallocs and 20,000 frees at 4 instructions
    _wp, counted = anatomy.gated_run([prog, "30000", "500", "1"], "armed", period=1)
    assert counted == 30000 + 500  # a malloc per pair, one per leak
