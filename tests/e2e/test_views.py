"""The motivating case through every view: a recording (report, leak suspects), each
flamegraph format, and `natrace top` in batch mode."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import scenario
from agenting import wait_for
from conftest import Env
from expect import check

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))


LONGEST = 600  # the app's own bound; the tests end it once natrace has seen enough
LEAK_SNAPSHOTS = 10  # a growth sample precedes each snapshot: the suspect rule needs 5


def snapshots_holding(rec: Path, function: str) -> int:
    """Snapshots of a recording in progress in which `function`'s site holds bytes."""
    if not rec.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{rec}?mode=ro", uri=True)) as db:
            return int(db.execute(
                "SELECT count(DISTINCT s.snapshot_id) FROM sites s JOIN stack_frames sf"
                " ON sf.stack_id = s.stack_id AND sf.position = s.charge_index"
                " JOIN frames f ON f.id = sf.frame_id WHERE f.symbol = ? AND s.bytes > 0",
                (function,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # busy (a snapshot is being written), or the schema not written yet


@pytest.fixture(scope="module")
def recorded(e2e: Env, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, scenario.Truth]:
    """The app recorded while it leaks, until LEAK_SNAPSHOTS snapshots hold the addon's
    leak (a fixed run of seconds gave a loaded machine's slow snapshots too few growth
    samples: no suspect), then stopped and left to exit."""
    tmp = tmp_path_factory.mktemp("rec")
    rec = tmp / "app.natrace"
    with (tmp / "stderr").open("w") as err:
        tracer = subprocess.Popen(
            [NATRACE, "record", "-o", str(rec), "--interval", "1s", "--",
             *scenario.app_command(e2e.conninfo, LONGEST, wait=True)],
            env={**os.environ, "VAULT_ADDON": str(e2e.addon)}, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err, text=True)
    assert tracer.stdin is not None and tracer.stdout is not None
    try:
        assert tracer.stdout.readline().startswith("ready")
        tracer.stdin.write("go\n")
        tracer.stdin.flush()
        wait_for(f"{LEAK_SNAPSHOTS} snapshots holding the addon's leak", lambda: (
            True if snapshots_holding(rec, "vault_stash_blocks") >= LEAK_SNAPSHOTS else None),
            patience=600)
        tracer.stdin.write("stop\n")
        tracer.stdin.flush()
        done = tracer.stdout.readline()
        assert done.startswith("done "), done
        tracer.stdin.close()  # the app exits: the recording's last snapshot
        assert tracer.wait(timeout=600) == 0, (tmp / "stderr").read_text()
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
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
    """The app leaks throughout top's 8 frames (ended only after them), so every frame's
    growth sample sees the leak however long each takes on a loaded machine. Its churned
    256 KiB Buffers are collected every 10th tick (--expose-gc): left to V8, they are
    freed only once 64 MiB of them add up, which on a loaded machine is more than 8
    frames, and node's ArrayBuffer allocator then grows steadily for all top can see."""
    node, *rest = scenario.app_command(e2e.conninfo, LONGEST, wait=True)
    app = subprocess.Popen([node, "--expose-gc", *rest],
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
        out, err = top.communicate(timeout=600)
        assert top.returncode == 0, err
        last = out.split("\n\n")[-3:]
        frame = "\n".join(last)
        rows = [ln for ln in frame.splitlines() if "vault_stash_blocks" in ln]
        assert rows and "LEAK" in rows[0], frame
        assert not [ln for ln in frame.splitlines() if "LEAK" in ln and " node " in ln], frame
    finally:
        app.kill()
        app.wait()
