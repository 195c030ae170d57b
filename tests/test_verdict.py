"""The verdict and the measured RSS split in natrace's reports, and `natrace whatif`,
against tests/fixtures/src/memory/frag.c (which prints its own mallinfo2 figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from framecheck import seen
from memfixtures import build
from test_books import JEMALLOC, MIB, Frag, frag
from tracing import attach

from tracer.commands.guard import TRIPPED
from tracer.commands.whatif import parse_variant
from tracer.errors import UsageError
from tracer.memory.reconcile import verdict
from tracer.model.books import AllocatorBooks, ArenaBooks, BooksReading, metrics

NATRACE = str(Path(sys.executable).with_name("natrace"))
pytestmark = pytest.mark.bpf


def snapshot(f: Frag, seconds: float, *args: str, drip: bool = False) -> dict[str, Any]:
    """`natrace snapshot -p` on the fixture for `seconds`; `drip`: the fixture starts its
    steady leak once natrace is attached."""
    tracer = attach(f.proc.pid, "--duration", str(seconds), "--json", *args)
    if drip:
        f.send("drip")
    out, err = tracer.communicate(timeout=300)
    assert tracer.returncode == 0, err
    memory: dict[str, Any] = seen("natrace snapshot", json.loads(out))["memory"]
    return memory


def assert_split_adds_up(mem: dict[str, Any]) -> None:
    split = mem["split"]
    assert sum(p["bytes"] for p in split["parts"]) == split["rss"]
    assert split["rss"] == sum(b["rss"] for b in mem["regions"]["by_backing"])


@pytest.mark.parametrize("threads", [2, 8])
def test_attached_after_fragmenting_the_verdict_is_fragmentation(threads: int) -> None:
    with frag("frag", threads) as f:
        mem = snapshot(f, 2)
        truth = f.mallinfo
    books = mem["books"]
    assert books["complete"] and len(books["arenas"]) == threads + 1
    assert books["free"] == truth["fordblks"]  # glibc's own figure, exactly
    assert abs(books["free"] - truth["fordblks"]) <= 0.05 * truth["fordblks"]
    assert_split_adds_up(mem)
    parts = {p["key"]: p["bytes"] for p in mem["split"]["parts"]}
    assert parts["free"] == books["free_resident"] > 200 * MIB
    # attached late: tracing saw none of the live blocks; the books measure them
    assert mem["split"]["traced_malloc"] < MIB
    assert 14 * MIB < parts["live"] < 17 * MIB  # 240 MiB / 16 of 1000-byte blocks
    assert len(mem["split"]["free_by_arena"]) == threads + 1
    v = mem["verdict"]
    assert v["kind"] == "fragmentation", v
    # holes between live blocks: another allocator is the advice, never pooling arenas
    assert any("jemalloc" in a for a in v["advice"])
    assert not any("MALLOC_ARENA_MAX=2 pools" in a for a in v["advice"])
    assert any("natrace whatif" in a for a in v["advice"])


def test_a_steady_leak_is_a_leak_and_no_fragmentation() -> None:
    with frag("leak", 2, drip_ms=100) as f:
        mem = snapshot(f, 6, "--no-allocs", drip=True)
    v = mem["verdict"]
    assert v["kind"] == "leak", v
    assert v["advice"] == []
    assert len(mem["books_timeline"]) >= 2
    in_use = [r["in_use"] for r in mem["books_timeline"]]
    assert in_use[-1] - in_use[0] > 8 * MIB
    assert_split_adds_up(mem)


def test_fragmentation_and_a_leak_at_once_is_both() -> None:
    with frag("both", 2, drip_ms=250) as f:  # slow: the leak fills holes as it grows
        mem = snapshot(f, 8, "--no-allocs", drip=True)
    v = mem["verdict"]
    assert v["kind"] == "both", v
    assert_split_adds_up(mem)


def test_jemalloc_preloaded_says_what_cannot_be_read() -> None:
    with frag("frag", 2, env={"LD_PRELOAD": JEMALLOC}) as f:
        mem = snapshot(f, 1, "--no-allocs")
    assert mem["books"]["allocator"] == "jemalloc" and not mem["books"]["readable"]
    assert mem["verdict"]["kind"] == "unknown"
    assert "jemalloc" in mem["verdict"]["evidence"][0]
    assert any("not measured" in n for n in mem["split"]["notes"])
    assert_split_adds_up(mem)


def test_whatif_on_the_fragmenting_program_shows_jemalloc_lower() -> None:
    proc = subprocess.run([NATRACE, "whatif", "--json", "--", str(build().frag), "frag", "2"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    runs = {r["variant"]: r for r in json.loads(proc.stdout)["runs"]}
    assert list(runs) == ["as is", "MALLOC_ARENA_MAX=2", "MALLOC_TRIM_THRESHOLD_=131072",
                          "jemalloc", "jemalloc, no decay"]
    assert all(r["exit_code"] == 0 and not r["stopped"] for r in runs.values())
    base = runs["as is"]
    assert base["free_inside"] > 200 * MIB and base["final_rss"] > 240 * MIB
    assert base["verdict"] in ("fragmentation", "both")  # (both: it grew while watched)
    assert runs["MALLOC_ARENA_MAX=2"]["final_rss"] > 0.9 * base["final_rss"]  # no help
    assert runs["jemalloc, no decay"]["final_rss"] < 0.5 * base["final_rss"]
    assert all(r["peak_rss"] >= r["final_rss"] for r in runs.values())
    # the fixture's output went to stderr: stdout held the JSON alone
    assert "books arena=" in proc.stderr


def test_whatif_text_and_bad_variants() -> None:
    proc = subprocess.run([NATRACE, "whatif", "--variant", "MALLOC_ARENA_MAX=1", "--",
                           str(build().frag), "idle", "1"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "natrace whatif: 2 runs of" in proc.stdout
    assert "MALLOC_ARENA_MAX=1" in proc.stdout
    bad = subprocess.run([NATRACE, "whatif", "--variant", "oops", "--", "true"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "is not NAME=VALUE" in bad.stderr
    missing = subprocess.run([NATRACE, "whatif", "--", "/nonexistent/cmd"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1
    assert "command not found" in missing.stderr
    with pytest.raises(UsageError):
        parse_variant("")
    assert parse_variant("A=1 'B=x y'").env == {"A": "1", "B": "x y"}


def _reading(at: float, in_use: int) -> BooksReading:
    return BooksReading(at, in_use, 0, 0)


def test_verdict_rules_and_metrics() -> None:
    arena = ArenaBooks(0x10, True, 1, 300 * MIB, 100 * MIB, 0, 150 * MIB, 0, 0, 500,
                       free_resident=240 * MIB)
    books = AllocatorBooks("glibc", True, arenas=[arena], trim_threshold=128 * 1024)
    flat = [_reading(t, 50 * MIB) for t in range(4)]
    start_up = [_reading(0, 0), _reading(1, 40 * MIB), _reading(2, 50 * MIB),
                _reading(3, 50 * MIB)]
    growing = [_reading(t, (10 + 5 * t) * MIB) for t in range(4)]
    assert verdict(books, flat, 300 * MIB).kind == "fragmentation"
    assert verdict(books, start_up, 300 * MIB).kind == "fragmentation"  # levelled off
    assert verdict(books, growing, 300 * MIB).kind == "both"
    assert verdict(books, growing[:1], 300 * MIB).kind == "fragmentation"  # one: not judged
    assert verdict(books, growing[:2], 300 * MIB).kind == "both"
    assert verdict(books, growing, 4000 * MIB).kind == "leak"  # free small against RSS
    assert verdict(None, growing, 300 * MIB).kind == "unknown"
    torn = AllocatorBooks("glibc", True, torn=[0x10])
    assert verdict(torn, growing, 300 * MIB).kind == "unknown"
    gauges = {(n, tuple(sorted(lb.items()))): v for n, lb, v in
              metrics(books, None, verdict(books, growing, 300 * MIB))}
    assert gauges[("natrace_allocator_free_bytes", (("arena", "main"),))] == 250 * MIB
    assert gauges[("natrace_memory_verdict", (("verdict", "both"),))] == 1.0
    assert gauges[("natrace_memory_verdict", (("verdict", "leak"),))] == 0.0


def test_guard_trip_report_carries_the_verdict(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    with frag("frag", 2) as f:
        guard = subprocess.run([NATRACE, "guard", "-p", str(f.proc.pid), "--rss-limit", "100M",
                                "--action", "report", "--report-dir", str(reports),
                                "--no-trace"], capture_output=True, text=True, timeout=300)
        assert guard.returncode == TRIPPED, guard.stderr
    text = next(reports.iterdir()).read_text()
    assert "Verdict: fragmentation/retention" in text
    assert "free inside the allocator" in text
