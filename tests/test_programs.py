"""Programs as they are really built: exits that free on the way out, static glibc C and
C++, musl static and dynamic. Ground truth in tests/fixtures/src/exits.cpp and plain.c;
real probes, `natrace run` and `natrace snapshot -p`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build_programs
from test_alloc_tracing import malloc_sites, run_json
from tracing import snapshot_json, waiting

pytestmark = pytest.mark.bpf

PLAIN_TRUTH = {"leak_plain": (1_500, 5), "leak_strdup": (84, 7)}


def user_sites(report: dict[str, Any], names: set[str]) -> dict[str, tuple[int, int]]:
    return {k: v for k, v in malloc_sites(report).items() if k in names}


#: exits.cpp's Holder constructor, which -O1 inlines into make_holders()
HOLDER = "Holder::Holder(unsigned long)"

@pytest.mark.parametrize("static", [False, True])
def test_frees_at_exit_are_not_leaks(static: bool, tmp_path: Path) -> None:
    """The report is taken at _Exit: atexit handlers and static and thread_local
    destructors have freed their 80, 123 and 4 B by then (at exit() entry they were
    reported as leaks). Static C++: operator new is inside the executable, the bytes
    are still charged to its caller."""
    fx = build_programs()
    report, code = run_json(tmp_path, "--", str(fx.exits_static if static else fx.exits))
    assert code == 0
    assert report["target_exited"] is True
    sites = malloc_sites(report)
    assert sites["leak_forever()"] == (300, 3)
    assert not {"kept_until_atexit()", HOLDER, "make_holders()", "free_at_exit()"} & \
        sites.keys()
    assert not any("operator new" in name for name in sites)
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.parametrize("kind", ["plain_static", "musl_static", "musl"])
def test_static_and_musl_programs_are_named_and_exact(kind: str, tmp_path: Path) -> None:
    """The allocator and the exit stop come from the executable itself when it is
    static; every memory sample is of the program, never of natrace's pre-exec gate
    (a python3 of tens of MiB: these programs stay under 4 MiB)."""
    report, code = run_json(tmp_path, "--", str(getattr(build_programs(), kind)))
    assert code == 0
    assert user_sites(report, set(PLAIN_TRUTH)) == PLAIN_TRUTH
    assert "no_leak" not in malloc_sites(report)
    timeline = report["memory"]["timeline"]
    assert timeline and max(s["rss"] for s in timeline) < 4 << 20, timeline
    assert not any(report["loss"].values()), report["loss"]


@pytest.mark.parametrize("kind", ["plain_static", "exits_static"])
def test_snapshot_attaches_to_a_static_program(kind: str) -> None:
    fx = build_programs()
    with waiting(str(getattr(fx, kind)), "--wait") as target:
        report = snapshot_json(target)
    sites = malloc_sites(report)
    if kind == "plain_static":
        assert user_sites(report, set(PLAIN_TRUTH)) == PLAIN_TRUTH
    else:
        assert sites["leak_forever()"] == (300, 3)
        # live while it runs: 123 + 4 B, malloc'ed by Holder's constructor (inlined
        # into make_holders, a frame of its own)
        assert sites[HOLDER] == (127, 2)
        holder = next(s for s in report["sites"] if s["function"] == HOLDER)
        below = holder["stack"][holder["charge_index"] + 1]
        assert holder["stack"][holder["charge_index"]]["inlined"]
        assert below["symbol"] == "make_holders()" and not below["inlined"]
        assert sites["kept_until_atexit()"] == (80, 1)
    assert not any(report["loss"].values()), report["loss"]
