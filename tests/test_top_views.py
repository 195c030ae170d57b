"""The plain-text tables behind `natrace top`, from a synthetic model (no probes)."""

from __future__ import annotations

from tracer.engine.live import LiveState, ProcessStats
from tracer.model.callsite import CallSite
from tracer.model.frames import Frame
from tracer.model.handles import HandleSite, HandleType
from tracer.model.snapshot import Snapshot
from tracer.tui.views import VIEWS, handles_table


def state_with(snapshot: Snapshot) -> LiveState:
    return LiveState(snapshot=snapshot, fits={}, suspects=[],
                     process=ProcessStats(), events_per_s=0.0, lost=0, ended=False)


def test_handles_view_lists_pairs_and_their_creation_sites() -> None:
    site = CallSite([Frame(0x10, "/app/bin/app", 0x10, "keep_reports", module_class="app")],
                    callee="PQexec")
    pgresult = HandleType("libpq PGresult", "/usr/lib/libpq.so.5", ["PQmakeEmptyPGresult"],
                          "PQclear", 1, True, created=500, destroyed=363, live=137,
                          per_minute=120.0, oldest_age=41.0,
                          sites=[HandleSite(site, live=137, created=500, oldest_age=41.0)])
    table = handles_table(state_with(Snapshot(pid=1, command="app", taken_at=0.0,
                                              duration=1.0, handles=[pgresult])))
    assert [r.cells[:3] for r in table.rows] == [("libpq PGresult", "137", "500"),
                                                 ("", "137", "500")]
    assert table.rows[1].cells[-1] == "keep_reports via PQexec"
    assert table.rows[1].stack  # Enter shows the creation stack
    assert VIEWS["handles"][0] == "6"


def test_handles_view_without_pairs_says_so() -> None:
    table = handles_table(state_with(Snapshot(pid=1, command="app", taken_at=0.0,
                                              duration=1.0)))
    assert not table.rows and "no handle pairs" in table.empty
