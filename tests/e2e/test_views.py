"""The motivating case through every view: a recording (report, leak suspects), each
flamegraph format, and `natrace top` in batch mode."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scenario
from conftest import Env
from expect import check

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))
SECONDS = 10


@pytest.fixture(scope="module")
def recorded(e2e: Env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, scenario.Truth]:
    rec = tmp_path_factory.mktemp("rec") / "app.natrace"
    proc = subprocess.run(
        [NATRACE, "record", "-o", str(rec), "--interval", "1s", "--",
         *scenario.app_command(e2e.conninfo, SECONDS)],
        env={**os.environ, "VAULT_ADDON": str(e2e.addon)}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = next(ln for ln in proc.stdout.splitlines() if ln.startswith("done "))
    return rec, scenario.truth_from(done, e2e.libpq_per_call)


def test_recording_reports_the_same_and_names_the_suspects(
        recorded: tuple[Path, scenario.Truth], tmp_path: Path) -> None:
    rec, truth = recorded
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "report", str(rec), "--json", "-o", str(out)], check=True,
                   capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    check(report, truth)
    suspects = {(s["function"], s["module_class"]) for s in report["sites"] if s["suspect"]}
    assert ("vault_stash_blocks", "addon:vault") in suspects
    assert not [s for s in suspects if s[1] == "node"], suspects  # V8/Node churn is not


def test_every_flamegraph_format(recorded: tuple[Path, scenario.Truth], tmp_path: Path) -> None:
    rec, _ = recorded
    report = json.loads(subprocess.run([NATRACE, "report", str(rec), "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    outputs = {fmt: tmp_path / f"flame.{ext}" for fmt, ext in
               [("folded", "folded"), ("html", "html"), ("svg", "svg"),
                ("speedscope", "speedscope.json"), ("pprof", "pb.gz")]}
    for fmt, path in outputs.items():
        subprocess.run([NATRACE, "flamegraph", str(rec), "--format", fmt, "-o", str(path)],
                       check=True, capture_output=True, timeout=120)
    folded = outputs["folded"].read_text().splitlines()
    assert sum(int(line.rsplit(" ", 1)[1]) for line in folded) == report["totals"]["bytes"]
    assert any("vault_stash_blocks" in line for line in folded)
    for fmt in ("html", "svg"):
        assert "vault_stash_blocks" in outputs[fmt].read_text()
    speedscope = json.loads(outputs["speedscope"].read_text())
    assert any(f["name"].startswith("vault_stash_blocks")
               for f in speedscope["shared"]["frames"])
    assert b"vault_stash_blocks" in gzip.decompress(outputs["pprof"].read_bytes())


def test_top_batch_marks_the_addon_leak(e2e: Env) -> None:
    app = subprocess.Popen(scenario.app_command(e2e.conninfo, SECONDS, wait=True),
                           env={**os.environ, "VAULT_ADDON": str(e2e.addon)},
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert app.stdin is not None and app.stdout is not None
    try:
        assert app.stdout.readline().startswith("ready")
        top = subprocess.Popen([NATRACE, "top", "-p", str(app.pid), "--interval", "1s",
                                "--iterations", "8"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        assert top.stderr is not None
        assert "attached to PID" in top.stderr.readline()
        app.stdin.write("go\n")
        app.stdin.flush()
        out, err = top.communicate(timeout=300)
        assert top.returncode == 0, err
        last = out.split("\n\n")[-3:]
        frame = "\n".join(last)
        rows = [ln for ln in frame.splitlines() if "vault_stash_blocks" in ln]
        assert rows and "LEAK" in rows[0], frame
        assert not [ln for ln in frame.splitlines() if "LEAK" in ln and " node " in ln], frame
    finally:
        app.kill()
        app.wait()
