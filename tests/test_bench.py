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
                          "empty-probe floor", "floor, free at +0", "memleak-bpfcc",
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
