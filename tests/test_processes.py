"""Process trees: `run` traces the processes the command forks (services start through
sh -c, timeout, npm start), `snapshot -p PID --children` a running process's; each
process is reported on its own, exact, and all of them together. Real probes; ground
truth in tests/fixtures/src/forker.c and plain.c, built -O2 without frame pointers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build_trees
from test_alloc_tracing import run_json
from test_programs import PLAIN_TRUTH
from tracing import NATRACE, snapshot_json, waiting

pytestmark = pytest.mark.bpf

SUMMED = ("bytes", "blocks", "allocs", "alloc_bytes", "temp_allocs", "temp_bytes")


def own_sites(entry: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """A process's malloc sites: function -> (unfreed bytes, blocks, allocations)."""
    return {s["function"]: (s["bytes"], s["blocks"], s["allocs"]) for s in entry["sites"]
            if s["kind"] == "malloc" and s["function"]}


def check_adds_up(report: dict[str, Any]) -> None:
    """Every list adds up to its total: the combined sites, each process's sites, and
    the processes' totals to the report's."""
    procs = report["processes"]
    for k in SUMMED:
        assert sum(s[k] for s in report["sites"]) == report["totals"][k], k
        assert sum(p["totals"][k] for p in procs) == report["totals"][k], k
        for p in procs:
            assert sum(s[k] for s in p["sites"]) == p["totals"][k], (p["pid"], k)
    assert {s["pid"] for s in report["sites"]} <= {p["pid"] for p in procs}
    assert not any(report["loss"].values()), report["loss"]


def check_forker(report: dict[str, Any], root: int) -> None:
    """The parent leaks 4 x 1000 B; worker 1 3 x 512 B, worker 2 6 x 512 B, each with
    7 temporary 64 B blocks: exact, each in its own process."""
    parent, *workers = report["processes"]
    assert parent["pid"] == root and parent["parent"] is None
    assert len(workers) == 2, [p["command"] for p in report["processes"]]
    sites = own_sites(parent)
    assert sites["parent_leak"] == (4_000, 4, 4) and "worker_leak" not in sites
    found = []
    for w in workers:
        assert w["parent"] == root and w["exited"], w
        assert "forker" in w["command"]
        sites = own_sites(w)
        assert "parent_leak" not in sites, sites  # the 2 blocks it inherited stay the parent's
        found.append(sites["worker_leak"])
        [leak] = [s for s in w["sites"] if s["function"] == "worker_leak"]
        assert (leak["temp_allocs"], leak["temp_bytes"]) == (7, 7 * 64)
    assert sorted(found) == [(1_536, 3, 10), (3_072, 6, 13)]
    by_pid = {(s["pid"], s["function"]): s["bytes"] for s in report["sites"]}
    assert {k: v for k, v in by_pid.items() if k[1] in ("parent_leak", "worker_leak")} == {
        (root, "parent_leak"): 4_000, (workers[0]["pid"], "worker_leak"): found[0][0],
        (workers[1]["pid"], "worker_leak"): found[1][0]}
    assert not any("not traced" in n for n in report["notes"]), report["notes"]
    for w in workers:  # the same function in two processes: each finding names its own
        nbytes, blocks, _allocs = own_sites(w)["worker_leak"]
        says = f" [forker] [PID {w['pid']}] holds {nbytes:,} B in {blocks} blocks"
        assert any(f.startswith("worker_leak") and says in f for f in report["findings"]), \
            report["findings"]
    check_adds_up(report)


def test_a_forking_server_is_exact_per_process_when_launched(tmp_path: Path) -> None:
    """... and so is its recording: each site keeps its process (a recording that lost
    them reported every site as the parent's, the workers with none)."""
    recording = tmp_path / "r.natrace"
    report, code = run_json(tmp_path, "--record", str(recording), "--", str(build_trees().forker))
    assert code == 0
    check_forker(report, report["pid"])
    proc = subprocess.run([NATRACE, "report", "--json", str(recording)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    check_forker(again, report["pid"])
    assert again["processes"] == report["processes"]


def test_an_exited_child_keeps_its_figures_not_its_maps() -> None:
    """A forking server's short children: once one is gone its sites are kept as first
    symbolized and its maps and symbolizer dropped (they were kept to the end, for
    thousands of children); every later snapshot is the same, exact."""
    from tracer.engine.session import Session, SessionOptions
    from tracer.probes import target as targets
    from tracer.reporters import json as json_report

    target = targets.launch([str(build_trees().forker)])
    session = Session(target, SessionOptions())
    try:
        session.start()
        session.run(None)
        first = json.loads(json_report.render(session.snapshot()))
        again = json.loads(json_report.render(session.snapshot()))
        workers = {pid: c for pid, c in session.children.items() if pid != target.pid}
    finally:
        session.close()
    check_forker(first, target.pid)
    assert again["processes"] == first["processes"] and again["sites"] == first["sites"]
    assert len(workers) == 2
    for pid, child in workers.items():
        assert child.maps is None and child.sites is not None, pid
        assert pid not in session._call_sites


def test_a_forking_server_is_exact_per_process_when_attached_with_children() -> None:
    with waiting(str(build_trees().forker), "--wait") as target:
        report = snapshot_json(target, "--children")
        check_forker(report, target.pid)


def test_children_of_an_attached_process_are_named_without_children() -> None:
    with waiting(str(build_trees().forker), "--wait") as target:
        report = snapshot_json(target)
    assert [p["pid"] for p in report["processes"]] == [target.pid]
    assert own_sites(report["processes"][0])["parent_leak"] == (4_000, 4, 4)
    [note] = [n for n in report["notes"] if "not traced" in n]
    assert note.startswith(f"2 child process(es) of {target.pid} are not traced") and \
        "--children" in note, note


def check_plain_child(report: dict[str, Any], plain: Path) -> None:
    """The program the wrapper started is one process of the report, exact."""
    ran = [p for p in report["processes"] if p["command"].split()[0] == str(plain)]
    assert len(ran) == 1, [p["command"] for p in report["processes"]]
    sites = own_sites(ran[0])
    assert {k: v[:2] for k, v in sites.items() if k in PLAIN_TRUTH} == PLAIN_TRUTH
    assert not any("not traced" in n for n in report["notes"]), report["notes"]
    check_adds_up(report)


@pytest.mark.parametrize("wrapper", ["sh -c APP", "sh -c 'APP; echo x'", "timeout 60 APP"])
def test_a_program_started_by_a_wrapper_is_exact(wrapper: str, tmp_path: Path) -> None:
    """dash forks for `sh -c './app'` as for `sh -c './app; echo x'`; timeout forks and
    execs the program in its child."""
    plain = build_trees().plain
    argv = {"sh -c APP": ["sh", "-c", str(plain)],
            "sh -c 'APP; echo x'": ["sh", "-c", f"{plain}; echo x"],
            "timeout 60 APP": ["timeout", "60", str(plain)]}[wrapper]
    report, code = run_json(tmp_path, "--", *argv)
    assert code == 0
    check_plain_child(report, plain)


def test_a_shell_loop_is_exact_per_run_with_one_note(tmp_path: Path) -> None:
    """`sh -c 'for …; do APP; done'` runs APP in a new child each time: each run is a
    process of the report, exact, and the exec chain they share is one note naming them
    all (a note per child repeated the same long line once per iteration)."""
    plain = build_trees().plain
    report, code = run_json(tmp_path, "--", "sh", "-c", f"for i in 1 2 3; do {plain}; done")
    assert code == 0
    runs = [p for p in report["processes"] if p["command"] == str(plain)]
    assert len(runs) == 3, [p["command"] for p in report["processes"]]
    for run in runs:
        assert {k: v[:2] for k, v in own_sites(run).items() if k in PLAIN_TRUTH} == PLAIN_TRUTH
    chain = f"'/usr/bin/sh -c for i in 1 2 3; do {plain}; done' -> '{plain}'"
    pids = ", ".join(str(p["pid"]) for p in runs)
    assert [n for n in report["notes"] if "through exec" in n] == [
        f"followed 3 processes through exec: {chain} (PIDs {pids}); each one's report is of "
        "the last program"]
    check_adds_up(report)


def test_npm_start_is_exact(tmp_path: Path) -> None:
    """`npm start` runs the package's start script through sh -c, from node."""
    plain = build_trees().plain
    (tmp_path / "package.json").write_text(json.dumps(
        {"name": "trees", "version": "1.0.0", "scripts": {"start": str(plain)}}))
    out = tmp_path / "r.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", "npm", "start",
                           "--prefix", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "npm_config_update_notifier": "false"})
    assert proc.returncode == 0, proc.stderr
    check_plain_child(json.loads(out.read_text()), plain)
