"""Stacks of the children natrace follows, without frame pointers: each process is
walked with its own unwind table (tracer/probes/unwinding.py), so a program a shell
exec'd, a forked child (no exec) and the library either dlopen()s later are unwound
as truly as the launched command. Ground truth in tests/fixtures/src/nofp/childleak.c,
built -O2 -fomit-frame-pointer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build_nofp
from test_alloc_tracing import run_json

pytestmark = pytest.mark.bpf

START = ["main", "__libc_start_call_main", "__libc_start_main@@GLIBC_2.34", "_start"]
# function -> ((bytes, blocks), its whole stack): every frame up to the thread's first
TRUTH = {
    "leak_site": ((300_000, 300), ["leak_site", "leak_some", "work", *START]),
    "plug_leak": ((10_000, 20), ["plug_leak", "call_plug", "work", *START]),
}


def _argv(how: str) -> list[str]:
    prog = str(build_nofp().childleak)
    return {"dash": ["sh", "-c", f"{prog}; true"],  # dash vforks, the child execs
            "bash": ["bash", "-c", f"{prog}; true"],  # bash forks, the child execs
            "fork": [prog, "fork"]}[how]  # the child runs on in its parent's program


def _child(report: dict[str, Any]) -> dict[str, Any]:
    """The one process the command forked, which did the work."""
    [child] = [p for p in report["processes"] if p["parent"] == report["pid"]]
    assert "childleak" in child["command"], child["command"]
    assert not [s for s in report["sites"] if s["pid"] == report["pid"] and
                s["function"] in TRUTH], "the work is the child's"
    return child


@pytest.mark.parametrize("how", ["dash", "bash", "fork"])
def test_a_childs_stacks_are_walked_with_its_own_mappings(how: str, tmp_path: Path) -> None:
    report, code = run_json(tmp_path, "--", *_argv(how))
    assert code == 0
    child = _child(report)
    for function, (figures, frames) in TRUTH.items():
        [s] = [s for s in child["sites"] if s["function"] == function]
        assert (s["bytes"], s["blocks"]) == figures, (function, s)
        assert [f["symbol"] for f in s["stack"]] == frames, s["stack"]
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.parametrize("how", ["dash", "bash", "fork"])
def test_no_walk_of_a_childs_blocks_is_cut_short(how: str, tmp_path: Path) -> None:
    """Charged to their first libc frame (the thread's start), the child's 320 blocks
    are one site: not one of their walks ended before it (a walk cut at an address
    outside the table's mappings would be charged to a frame below)."""
    report, code = run_json(tmp_path, "--charge-to", "module:libc", "--", *_argv(how))
    assert code == 0
    [s] = [s for s in _child(report)["sites"] if s["function"] == "__libc_start_call_main"]
    assert (s["bytes"], s["blocks"], s["allocs"]) == (310_000, 320, 320), s
    assert not any(report["loss"].values()), report["loss"]


def test_a_shell_loops_children_give_their_rows_back(tmp_path: Path) -> None:
    """40 children run one after another, each with ~31k rows (libc, ld.so) written
    three times (exec, libc's mapping, the dlopen): 3.7M rows in all, against a table of
    2^20. Each exited child's rows and slot are freed, so every run is unwound in full
    and no object falls back to frame pointers for want of room."""
    prog = str(build_nofp().childleak)
    report, code = run_json(tmp_path, "--", "sh", "-c", f"for i in $(seq 40); do {prog}; done")
    assert code == 0
    runs = [p for p in report["processes"] if p["command"] == prog]
    assert len(runs) == 40, [p["command"] for p in report["processes"]]
    for run in runs:
        for function, (figures, frames) in TRUTH.items():
            [s] = [s for s in run["sites"] if s["function"] == function]
            assert (s["bytes"], s["blocks"]) == figures, (run["pid"], function, s)
            assert [f["symbol"] for f in s["stack"]] == frames, (run["pid"], s["stack"])
    assert "fp (table full)" not in report["unwinding"]["objects"].values()
    assert not any(report["loss"].values()), report["loss"]
