"""Handle lifecycles against fixtures with exact ground truth (tests/fixtures/src/handles).

Real probes on real processes: libpq against a private PostgreSQL server, a Node-API
addon under /usr/bin/node, and user-defined pairs on a fixture library; through
`natrace run --json -o FILE -- CMD` and `natrace snapshot -p PID`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from handlefixtures import build
from pgserver import PgServer, private_server
from tracing import snapshot_json, waiting

from tracer.probes.handles import find_library, parse_pair

NATRACE = str(Path(sys.executable).with_name("natrace"))


def run_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    return json.loads(out.read_text())


def pair(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [h for h in report["handles"] if h["name"] == name]
    assert len(found) == 1, [h["name"] for h in report["handles"]]
    return found[0]


def live_by_function(handle: dict[str, Any]) -> dict[str, int]:
    return {s["function"]: s["live"] for s in handle["sites"]}


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with private_server(port=54331) as server:
        yield server


# -- without probes ------------------------------------------------------------------

def test_parse_pair() -> None:
    p = parse_pair("libssl:SSL_new:SSL_free")
    assert (p.library, p.create, p.destroy, p.destroy_arg) == ("libssl", ("SSL_new",),
                                                               "SSL_free", 1)
    assert p.name == "libssl SSL_new"
    p = parse_pair("/opt/lib/libw.so.2:w_new,w_dup:w_close:2")
    assert (p.create, p.destroy_arg, p.name) == (("w_new", "w_dup"), 2, "libw w_new")
    for bad in ("libssl", "libssl:SSL_new", "libssl::SSL_free", "libssl:SSL_new:SSL_free:0",
                "libssl:SSL_new:SSL_free:x", "libssl:SSL new:SSL_free", "a:b:c:1:2"):
        with pytest.raises(ValueError, match="--handle"):
            parse_pair(bad)


def test_find_library() -> None:
    files = ["/usr/bin/node", "/lib/x86_64-linux-gnu/libpq.so.5", "/usr/lib/libssl.so.3"]
    assert find_library("libpq", files) == files[1]
    assert find_library("libpq.so.5", files) == files[1]
    assert find_library("node", files) == files[0]
    assert find_library("libssl", files) == files[2]
    assert find_library("libss", files) is None
    assert find_library("/nonexistent/libx.so", files) is None


def test_bad_handle_spec_is_one_line() -> None:
    proc = subprocess.run([NATRACE, "run", "--handle", "libssl:SSL_new", "--", "true"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "natrace: --handle 'libssl:SSL_new': expected LIB:CREATE:DESTROY[:ARG], "
        "e.g. libssl:SSL_new:SSL_free"]


# -- real probes ---------------------------------------------------------------------

@pytest.mark.bpf
def test_libpq_results_and_connections(tmp_path: Path, pg: PgServer) -> None:
    report = run_json(tmp_path, "--", str(build().pgresults), pg.conninfo)
    results = pair(report, "libpq PGresult")
    assert results["preset"] is True
    assert results["live"] == 137
    assert live_by_function(results) == {"keep_reports": 100, "keep_audit": 37}
    assert results["destroyed"] >= 363  # libpq clears results of its own too
    assert results["created"] - results["destroyed"] == 137
    assert results["destroyed_unknown"] == 0
    assert results["stale"] == results["untracked"] == 0
    top = results["sites"][0]
    assert (top["function"], top["via"], top["module_class"]) == ("keep_reports", "PQexec",
                                                                 "pgresults")
    assert results["sites"][1]["via"] == "PQexecParams"
    assert results["oldest_age"] > 0

    conns = pair(report, "libpq PGconn")
    # main's connection, then open_pool's three (PQconnectdb makes its handle inside
    # PQconnectStart: counted once); close_one and main finish one each
    assert (conns["created"], conns["destroyed"], conns["live"]) == (4, 2, 2)
    assert live_by_function(conns) == {"open_pool": 2}


@pytest.mark.bpf
def test_libpq_loaded_later_is_traced(tmp_path: Path, pg: PgServer) -> None:
    """pg-native's case: libpq dlopen()ed after the start gets the presets anyway (the
    loader's copy is probed by path from the start), launched and attached."""
    report = run_json(tmp_path, "--", str(build().pglate), pg.conninfo)
    results = pair(report, "libpq PGresult")
    assert results["live"] == 25
    assert live_by_function(results) == {"keep_late": 25}
    assert pair(report, "libpq PGconn")["live"] == 1
    with waiting(str(build().pglate), pg.conninfo, "--wait") as target:
        report = snapshot_json(target)
    results = pair(report, "libpq PGresult")
    assert (results["live"], live_by_function(results)) == (25, {"keep_late": 25})
    assert live_by_function(pair(report, "libpq PGconn")) == {"open_late": 1}


@pytest.mark.bpf
def test_libpq_snapshot_of_a_running_process(pg: PgServer) -> None:
    with waiting(str(build().pgresults), pg.conninfo, "--wait") as target:
        report = snapshot_json(target)
        assert report["target_exited"] is False
        results = pair(report, "libpq PGresult")
        assert results["live"] == 137
        assert live_by_function(results) == {"keep_reports": 100, "keep_audit": 37}
        assert pair(report, "libpq PGconn")["live"] == 2
        assert target.poll() is None


@pytest.mark.bpf
@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_napi_references(tmp_path: Path) -> None:
    fx = build()
    report = run_json(tmp_path, "--", "node", str(fx.refs_js), str(fx.refs_node))
    refs = pair(report, "node napi_ref")
    assert (refs["created"], refs["destroyed"], refs["live"]) == (50, 20, 30)
    assert live_by_function(refs) == {"keep_refs": 30}
    assert refs["sites"][0]["module_class"] == "addon:refs"


@pytest.mark.bpf
def test_user_pairs_exact(tmp_path: Path) -> None:
    fx = build()
    report = run_json(tmp_path, "--handle", "libwidget:widget_new,widget_pair:widget_free",
                      "--handle", f"{fx.libwidget}:gadget_open:gadget_close:2", "--",
                      str(fx.widgets))
    widgets = pair(report, "libwidget widget_new")
    assert widgets["preset"] is False
    # 40 + 5 pairs of two (the outer widget is returned by widget_new inside widget_pair
    # and by widget_pair: counted once)
    assert (widgets["created"], widgets["destroyed"], widgets["live"]) == (50, 15, 35)
    assert live_by_function(widgets) == {"make_widgets": 25, "make_pairs": 10}
    gadgets = pair(report, "libwidget gadget_open")
    assert (gadgets["created"], gadgets["destroyed"], gadgets["live"]) == (12, 5, 7)
    assert live_by_function(gadgets) == {"make_gadgets": 7}
    assert not any(h["preset"] for h in report["handles"])


@pytest.mark.bpf
def test_destroying_handles_made_before_attach_is_counted(tmp_path: Path) -> None:
    fx = build()
    with waiting(str(fx.widgets), "--wait") as target:
        report = snapshot_json(target, "--handle", "libwidget:widget_new:widget_free")
    widgets = pair(report, "libwidget widget_new")
    # widget_pair is not traced here: its two widget_new calls count as two handles
    assert (widgets["created"], widgets["destroyed"], widgets["destroyed_unknown"],
            widgets["live"]) == (50, 15, 4, 35)


@pytest.mark.bpf
def test_user_pair_with_unknown_function_is_one_line() -> None:
    fx = build()
    proc = subprocess.run([NATRACE, "run", "--handle", "libwidget:widget_nope:widget_free",
                           "--", str(fx.widgets)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "defines no function widget_nope" in lines[0], proc.stderr


@pytest.mark.bpf
def test_no_handles_turns_presets_off(tmp_path: Path, pg: PgServer) -> None:
    report = run_json(tmp_path, "--no-handles", "--", str(build().pgresults), pg.conninfo)
    assert report["handles"] == []
