"""Allocation tracing against fixtures with exact ground truth (tests/fixtures/src/leaky.c).

Real probes on real processes: `natrace run -- CMD` and `natrace snapshot -p PID`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build
from tracing import snapshot_json, waiting

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))

# function -> (bytes, blocks) still allocated when leaky finishes (from leaky.c)
LEAKY_TRUTH = {
    "leak_malloc": (10_000, 10),
    "leak_calloc": (2_000, 5),
    "leak_realloc_chain": (4_096, 1),
    "leak_posix_memalign": (768, 3),
    "leak_aligned_alloc": (1_024, 2),
    "leak_strdup": (84, 7),
    "thread_leak": (20_000, 100),
    "churn": (2_112, 33),
    "lib_leak": (999, 3),
}
PLUGIN_TRUTH = {"plugin_leak": (2_220, 5)}
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def malloc_sites(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Malloc sites that still hold memory: function -> (bytes, blocks)."""
    return {s["function"]: (s["bytes"], s["blocks"]) for s in report["sites"]
            if s["kind"] == "malloc" and s["function"] and (s["bytes"] or s["blocks"])}


def site(report: dict[str, Any], function: str, kind: str = "malloc") -> dict[str, Any]:
    found = [s for s in report["sites"] if s["function"] == function and s["kind"] == kind]
    assert len(found) == 1, (function, kind, [s["label"] for s in report["sites"]])
    return found[0]


def run_json(tmp_path: Path, *args: str, preload: str = "") -> tuple[dict[str, Any], int]:
    out = tmp_path / "report.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), *args],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "LD_PRELOAD": preload})
    assert out.exists(), proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    return json.loads(out.read_text()), proc.returncode


def assert_leaky_truth(report: dict[str, Any], with_plugin: bool) -> None:
    sites = malloc_sites(report)
    truth = {**LEAKY_TRUTH, **(PLUGIN_TRUTH if with_plugin else {})}
    for function, expected in truth.items():
        assert sites.get(function) == expected, (function, sites)
    assert "no_leak" not in sites
    assert "temporary" not in sites
    mmap = site(report, "leak_mmap", "mmap")
    assert (mmap["bytes"], mmap["blocks"]) == (12 * 4096, 2)  # 16 pages, 4 unmapped mid-way
    assert (mmap["allocs"], mmap["alloc_bytes"]) == (1, 16 * 4096)  # one mmap, allocated
    grown = site(report, "leak_mremap", "mmap")
    assert (grown["bytes"], grown["blocks"]) == (6 * 4096, 1)  # 2 pages mremap'ed to 6
    assert (grown["allocs"], grown["alloc_bytes"]) == (1, 2 * 4096)  # mremap is no new one
    assert site(report, "plugin_leak" if with_plugin else "leak_malloc")["stack"]
    assert not any(report["loss"].values()), report["loss"]


def test_run_exact_figures_for_every_entry_point(tmp_path: Path) -> None:
    fx = build()
    report, code = run_json(tmp_path, "--", str(fx.leaky), "--churn", "1000000", "--plugin",
                            str(fx.plugin), "--exit", "3")
    assert code == 3  # natrace run exits with the child's code
    assert report["target_exited"] is True
    assert_leaky_truth(report, with_plugin=True)
    plugin = site(report, "plugin_leak")
    assert plugin["module_class"] == "addon:plugin"
    assert site(report, "lib_leak")["module"].endswith("libleak.so")
    assert report["calls"]["allocs"] >= 1_000_000


def test_jemalloc_preloaded_is_traced_exactly(tmp_path: Path) -> None:
    """The allocator is found from what the target maps: jemalloc via LD_PRELOAD."""
    report, code = run_json(tmp_path, "--", str(build().leaky), "--churn", "100000",
                            preload=JEMALLOC)
    assert code == 0
    sites = malloc_sites(report)
    for function, expected in LEAKY_TRUTH.items():
        assert sites.get(function) == expected, (function, sites)
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.parametrize("preload", ["", JEMALLOC])
def test_blocks_past_the_table_spill_and_stay_exact(preload: str, tmp_path: Path) -> None:
    """--max-allocs 2048: a table of 1,024 slots (bpf/alloc.bpf.c's buckets) and a spill
    hash of 1,024. leaky holds more than 1,024 blocks at once (churn's 1,024 live slots
    above its earlier leaks, then leak_many's 1,000): the blocks past the table's slots
    are spilled, found again at their frees, and every figure stays exact."""
    report, code = run_json(tmp_path, "--max-allocs", "2048", "--", str(build().leaky),
                            "--churn", "100000", "--many", "1000", preload=preload)
    assert code == 0
    sites = malloc_sites(report)
    for function, expected in {**LEAKY_TRUTH, "leak_many": (1_000_000, 1_000)}.items():
        assert sites.get(function) == expected, (function, sites)
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.parametrize("preload", ["", JEMALLOC])
def test_cxx_new_is_charged_to_its_caller(preload: str, tmp_path: Path) -> None:
    """libstdc++'s new calls malloc; jemalloc's own new and delete bypass it."""
    report, code = run_json(tmp_path, "--", str(build().leaky_cpp), preload=preload)
    assert code == 0
    sites = malloc_sites(report)
    assert sites["make_widgets()"] == (6 * 48, 6)
    assert sites["make_array()"] == (400, 1)
    assert "temporary_strings()" not in sites


@pytest.mark.parametrize("wrapper", [["env", "FOO=1"], ["nice", "-n", "1"],
                                     ["sh", "-c", 'exec "$0" "$@"'],
                                     ["env", f"LD_PRELOAD={JEMALLOC}"]])
def test_run_follows_the_command_through_exec_wrappers(wrapper: list[str],
                                                       tmp_path: Path) -> None:
    """env, nice, a shell's exec: the program traced is the one the wrapper execs, from
    its first allocation, with the allocator its own environment preloads."""
    report, code = run_json(tmp_path, "--", *wrapper, str(build().leaky), "--exit", "3")
    assert code == 3
    assert report["command"].startswith(str(build().leaky))
    assert any("followed process" in n for n in report["notes"]), report["notes"]
    sites = malloc_sites(report)
    for function, expected in LEAKY_TRUTH.items():
        assert sites.get(function) == expected, (function, sites)
    mmap = site(report, "leak_mmap", "mmap")
    assert (mmap["bytes"], mmap["blocks"]) == (12 * 4096, 2)
    assert not any(report["loss"].values()), report["loss"]


def test_snapshot_attaches_to_a_running_process() -> None:
    fx = build()
    with waiting(str(fx.leaky), "--wait", "--churn", "200000", "--plugin",
                 str(fx.plugin)) as target:
        report = snapshot_json(target)
        assert report["target_exited"] is False
        assert_leaky_truth(report, with_plugin=True)
        assert target.poll() is None  # the target runs on, unharmed


def test_sampled_mode_estimates_within_ten_percent(tmp_path: Path) -> None:
    report, _ = run_json(tmp_path, "--sample", "16K", "--", str(build().leaky), "--many", "50000")
    assert report["mode"] == "sampled"
    got_bytes, got_blocks = malloc_sites(report)["leak_many"]
    assert abs(got_bytes - 50_000_000) / 50_000_000 < 0.10
    assert abs(got_blocks - 50_000) / 50_000 < 0.10


def test_sampled_figures_carry_samples_and_an_interval(tmp_path: Path) -> None:
    """At 512K, leak_many's 20,000 x 1000 B rest on ~38 samples: the estimate says how
    many and how sure (sites and Findings), and mapped bytes stay exact."""
    period = 512 * 1024
    report, _ = run_json(tmp_path, "--sample", "512K", "--", str(build().leaky), "--many",
                         "20000")
    many = site(report, "leak_many")
    n = many["samples"]
    assert n > 0 and many["bytes"] == n * period  # each 1000 B sample stands for a period
    half = 1.96 * many["bytes"] / n ** 0.5
    assert many["bytes_interval"] == [max(0, round(many["bytes"] - half)),
                                      round(many["bytes"] + half)]
    sd = (20_000_000 * period) ** 0.5  # Poisson: the estimate's variance is truth x period
    assert abs(many["bytes"] - 20_000_000) < 5 * sd
    assert site(report, "leak_mmap", "mmap")["bytes"] == 12 * 4096  # mappings: exact
    line = next(f for f in report["findings"] if f.startswith("leak_many"))
    assert "holds ~" in line and f", {n:,} samples) in ~" in line, line


def test_min_age_leaves_out_young_allocations(tmp_path: Path) -> None:
    report, _ = run_json(tmp_path, "--min-age", "1h", "--", str(build().leaky))
    assert report["totals"]["bytes"] == 0


def test_run_missing_command_is_one_line() -> None:
    proc = subprocess.run([NATRACE, "run", "--", "/nonexistent/cmd"], capture_output=True,
                          text=True)
    assert proc.returncode == 3
    assert proc.stderr.strip() == "natrace: command not found: /nonexistent/cmd"


def test_snapshot_bad_pid_is_one_line() -> None:
    proc = subprocess.run([NATRACE, "snapshot", "-p", "999999999"], capture_output=True,
                          text=True)
    assert proc.returncode == 3
    assert "no process with PID 999999999" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unprivileged_run_exits_2() -> None:
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "--inh-caps=-all", NATRACE, "run", "--", "true"],
                          capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    assert proc.returncode == 2, proc.stderr
    assert "root or CAP_BPF+CAP_PERFMON" in proc.stderr
    assert "Traceback" not in proc.stderr


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"  # libgoogle-perftools4
TCMALLOC_MINIMAL = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_calls_that_never_return_leave_no_thread_blind(tmp_path: Path) -> None:
    """A caught bad_alloc, a longjmp out of operator new and a siglongjmp out of
    realloc: every later allocation on the thread is still recorded, the call that
    never returned is counted, and the program's own catch still works (no uretprobe
    trampoline for the unwinder to trip on). Overflowing sizes are failed calls."""
    report, code = run_json(tmp_path, "--", str(build().unreturned), "--abort-in-realloc")
    assert code == 0  # terminate() would have made it 134
    sites = malloc_sites(report)
    assert sites["after_bad_alloc()"] == (2_000, 20)
    assert sites["leak_deep(int)"] == (40 * 48, 40)  # 20 after the longjmp, 20 after abort
    assert sites["kept_block()"] == (1_000, 1)  # reallocarray(p, 2^32, 2^32) failed: p lives
    assert sites["pvalloc_leak()"] == (4_096 + 8_192, 2)  # whole pages
    assert {k: v for k, v in report["loss"].items() if v} == {"unreturned": 1}


@pytest.mark.parametrize("preload", ["", TCMALLOC_MINIMAL, TCMALLOC, JEMALLOC])
def test_memalign_sequence_is_exact_under_each_allocator(preload: str, tmp_path: Path) -> None:
    """Every alignment, valid or not, through memalign and posix_memalign: everything
    freed is gone, and what follows on the thread is all there."""
    report, code = run_json(tmp_path, "--", str(build().memaligns), preload=preload)
    assert code == 0
    sites = malloc_sites(report)
    assert "memalign_sequence" not in sites
    assert sites["kept_aligned"] == (300, 3)
    assert sites["after_memaligns"] == (10_000, 10)
    assert not any(report["loss"].values()), report["loss"]
