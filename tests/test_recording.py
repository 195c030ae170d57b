"""Recordings (tracer/recording.py): round trip, SQL shape, report/diff from files, bad
input (missing, empty, truncated, corrupted, newer, fuzzed) and a recording cut short
by SIGKILL. Synthetic snapshots for the file format; real traces for record itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from allocfixtures import build
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.errors import FileFormatError
from tracer.model.callsite import CallSite
from tracer.model.faults import FaultSite, FaultSummary
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.recording import SCHEMA_VERSION, Recording, RecordingWriter

NATRACE = str(Path(sys.executable).with_name("natrace"))

MAIN = Frame(0x401000, "/opt/app/bin/app", 0x1000, "main", 0x20, module_class="app")
LEAK = Frame(0x401200, "/opt/app/bin/app", 0x1200, "leak_here", 0x8, "leak.c", 12, "app")
PQ = Frame(0x7F0000001000, "/usr/lib/libpq.so.5.15", 0x1000, "PQexec", 0x10,
           module_class="libpq")


def snap(at: float, leak_bytes: int, pq_bytes: int = 300, **extra: object) -> Snapshot:
    sites = [Site("malloc", [LEAK, MAIN], leak_bytes, leak_bytes // 100, leak_bytes // 100,
                  leak_bytes * 2),
             Site("malloc", [PQ, MAIN], pq_bytes, 3, 5, 900, charge_index=1, via="PQexec",
                  library_index=0),  # libpq's bytes charged to main
             Site("malloc", [], 64, 1, 1, 64, lost_stack="EEXIST"),
             Site("mmap", [MAIN], 1 << 20, 1, allocator_internal=True)]
    return Snapshot(pid=42, command="app --serve", taken_at=1_700_000_000 + at, duration=at,
                    sites=sites, loss={"stack_eexist": 1}, calls={"allocs": 99},
                    **extra)  # type: ignore[arg-type]


def write(path: Path, *snaps: Snapshot) -> Path:
    with RecordingWriter(str(path), {"pid": 42, "command": "app --serve"},
                         build_id=lambda p: "ab" * 20 if p.endswith("/app") else None) as w:
        for s in snaps:
            w.add(s)
    return path


def natrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NATRACE, *args], capture_output=True, text=True, timeout=120)


def test_round_trip_keeps_every_field_and_section(tmp_path: Path) -> None:
    faults = FaultSummary(True, 7, [FaultSite(CallSite([LEAK, MAIN]), 7)])
    first, last = snap(1.0, 1000), snap(2.0, 5000, faults=faults, exit_code=3,
                                         target_exited=True)
    path = write(tmp_path / "r.natrace", first, last)
    assert path.stat().st_mode & 0o777 == 0o600
    with Recording(str(path)) as rec:
        assert [s.duration for s in rec.snapshots] == [1.0, 2.0]
        assert rec.snapshot() == last
        assert rec.snapshot(1.5) == first
        assert rec.build_ids == {"/opt/app/bin/app": "ab" * 20}
        assert rec.meta["format"] == "natrace-recording"
        assert rec.meta["schema_version"] == str(SCHEMA_VERSION)


def test_frames_and_stacks_are_stored_once_and_queryable(tmp_path: Path) -> None:
    path = write(tmp_path / "r.natrace", snap(1.0, 1000), snap(2.0, 2000), snap(3.0, 3000))
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM frames").fetchone() == (3,)
    assert db.execute("SELECT count(*) FROM stacks").fetchone() == (3,)
    growth = db.execute(
        "SELECT s.snapshot_id, s.bytes FROM sites s JOIN stack_frames sf"
        " ON sf.stack_id = s.stack_id AND sf.position = s.charge_index"
        " JOIN frames f ON f.id = sf.frame_id WHERE f.symbol = 'leak_here'"
        " ORDER BY s.snapshot_id").fetchall()
    assert growth == [(1, 1000), (2, 2000), (3, 3000)]
    assert db.execute("SELECT total_bytes FROM snapshots WHERE id = 3").fetchone() == (3364,)


def test_report_and_diff_from_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.natrace", snap(1.0, 1000), snap(5.0, 2000))
    b = write(tmp_path / "b.natrace", snap(1.0, 9000, pq_bytes=100))
    proc = natrace("report", str(a), "--json", "--at", "1s")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["totals"]["bytes"] == 1000 + 300 + 64
    proc = natrace("report", str(a), "--module", "libpq", "--json")
    # libpq's bytes, charged to main that called PQexec
    assert [(s["function"], s["module_class"], s["via"])
            for s in json.loads(proc.stdout)["sites"]] == [("main", "libpq", "PQexec")]
    proc = natrace("diff", str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["bytes"] == 7000 - 200
    assert (d["sites"][0]["name"], d["sites"][0]["bytes"]) == ("leak_here+0x8 (leak.c:12)",
                                                              7000)
    assert {m["name"]: m["bytes"] for m in d["modules"]} == {"app": 7000, "libpq": -200,
                                                             "unknown": 0}
    proc = natrace("diff", f"{a}@1s", f"{a}@5s")
    assert proc.returncode == 0, proc.stderr
    assert "+1,000" in proc.stdout and "leak_here" in proc.stdout


def test_at_picks_the_nearest_snapshot_and_says_which(tmp_path: Path) -> None:
    """Snapshots at 2.03 s, 4.0 s and 6.0 s of tracing (every 2 s)."""
    path = tmp_path / "t.natrace"
    with RecordingWriter(str(path), {"pid": 42, "command": "app", "interval": 2.0}) as w:
        for at, leak in ((2.03, 1000), (4.0, 2000), (6.0, 3000)):
            w.add(snap(at, leak))
    for asked, leak, which in (("2s", 1000, "snapshot 1 of 3, taken 2.0 s into the trace "
                                              "(the nearest to 2 s)"),
                               ("4s", 2000, "snapshot 2 of 3, taken 4.0 s into the trace "
                                            "(the nearest to 4 s)"),
                               ("4.9s", 2000, "snapshot 2 of 3"), ("5.1s", 3000, "snapshot 3"),
                               ("1s", 1000, "snapshot 1 of 3"), ("7.5s", 3000, "snapshot 3")):
        proc = natrace("report", str(path), "--json", "--at", asked)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        leak_site = next(s for s in report["sites"] if s["function"] == "leak_here")
        assert leak_site["bytes"] == leak, asked
        assert any(n.startswith(f"this is {which}") for n in report["notes"]), report["notes"]
    text = natrace("report", str(path), "--at", "4s").stdout
    assert "Note: this is snapshot 2 of 3, taken 4.0 s into the trace" in text
    for args in (("report", str(path), "--at", "99m"), ("report", str(path), "--at", "8.1s"),
                 ("diff", f"{path}@2s", f"{path}@99m"),
                 ("report", str(path), "--module", "nosuch")):
        proc = natrace(*args)
        assert proc.returncode == 2, (args, proc.stdout)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "from 2.0 s to 6.0 s" in natrace("report", str(path), "--at", "99m").stderr
    assert "modules: app, libpq, unknown" in natrace("report", str(path), "--module",
                                                     "nosuch").stderr
    proc = natrace("diff", f"{path}@2s", f"{path}@4s")
    assert proc.returncode == 0, proc.stderr
    assert f"{path}@2s: snapshot 1 of 3" in proc.stderr
    assert f"{path}@4s: snapshot 2 of 3" in proc.stderr
    assert "+1,000" in proc.stdout


def sampled_snap() -> Snapshot:
    """An in-process sampled snapshot: leak_here's 2,000,000 B estimated from 4 samples
    (mean 512 KiB), allocated 8,000,000 B from 16."""
    sites = [Site("malloc", [LEAK, MAIN], 2_000_000, 2000, 8000, 8_000_000, samples=4,
                  alloc_samples=16)]
    return Snapshot(pid=42, command="app", taken_at=1_700_000_001.0, duration=1.0,
                    sample_bytes=512 << 10, in_process=True, sites=sites)


def test_sampled_sites_keep_their_sample_counts_and_older_schemas_still_read(
        tmp_path: Path) -> None:
    """Schema 3 stores each site's samples, so a report from the file shows the same
    intervals as the live one (2,000,000 ± 1.96 · 2,000,000 / √4); a schema 2 or 1
    file (the columns dropped) still reads, its estimates without intervals; schema 3
    and 4 files, without schema 5's library_index, and 5, without schema 6's pid, too."""
    path = write(tmp_path / "s.natrace", sampled_snap())
    with Recording(str(path)) as rec:
        assert rec.snapshot() == sampled_snap()
    proc = natrace("report", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    site = json.loads(proc.stdout)["sites"][0]
    assert (site["samples"], site["alloc_samples"]) == (4, 16)
    assert site["bytes_interval"] == [40_000, 3_960_000]
    assert site["alloc_bytes_interval"] == [4_080_000, 11_920_000]
    older = {5: ["pid"], 4: ["pid", "library_index"], 3: ["pid", "library_index"],
             2: ["pid", "library_index", "samples", "alloc_samples"],
             1: ["pid", "library_index", "samples", "alloc_samples", "temp_allocs",
                 "temp_bytes", "first_at", "last_at"]}
    for version, columns in older.items():
        old = tmp_path / f"v{version}.natrace"
        old.write_bytes(path.read_bytes())
        with contextlib.closing(sqlite3.connect(old)) as db:
            for column in columns:
                db.execute(f"ALTER TABLE sites DROP COLUMN {column}")
            if version == 1:
                db.execute("ALTER TABLE snapshots DROP COLUMN peak_bytes")
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                       (str(version),))
            db.commit()
        with Recording(str(old)) as rec:
            got = rec.snapshot().sites[0]
        counts = (4, 16) if version >= 3 else (0, 0)
        assert (got.bytes, got.alloc_bytes, got.samples, got.alloc_samples,
                got.library_index) == (2_000_000, 8_000_000, *counts, None), version
        proc = natrace("report", str(old), "--json")
        assert proc.returncode == 0, proc.stderr
        interval = [40_000, 3_960_000] if version >= 3 else None
        assert json.loads(proc.stdout)["sites"][0]["bytes_interval"] == interval, version


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "corrupted", "newer",
                                    "not-sqlite", "directory", "other-sqlite"])
def test_bad_files_are_one_line_exit_2(tmp_path: Path, damage: str) -> None:
    path = write(tmp_path / "r.natrace", *(snap(float(i), 1000 * i) for i in range(1, 30)))
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupted":
        path.write_bytes(data[:4096] + bytes(b ^ 0x5A for b in data[4096:8192]) + data[8192:])
    elif damage == "newer":
        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                       (str(SCHEMA_VERSION + 1),))
    elif damage == "not-sqlite":
        path.write_text("hello\n" * 100)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    elif damage == "other-sqlite":
        path.unlink()
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE t(x)")
    for args in (["report", str(path)], ["flamegraph", str(path), "-o",
                                         str(tmp_path / "f.svg")],
                 ["diff", str(path), str(path)]):
        proc = natrace(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("natrace: "), proc.stderr
    if damage == "newer":
        assert "newer natrace" in proc.stderr
    assert not (tmp_path / "f.svg").exists()


def read_all(path: Path) -> None:
    with Recording(str(path)) as rec:
        for info in rec.snapshots:
            rec.snapshot(info.duration)


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "r.natrace"
    return write(path, snap(1.0, 1000), snap(2.0, 2000)).read_bytes()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=1 << 16),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=1 << 16),
                                st.integers(min_value=1, max_value=255)), max_size=8))
def test_fuzzed_files_raise_only_file_format_errors(tmp_path: Path, sample_bytes: bytes,
                                                     cut: int, flips: list[tuple[int, int]]
                                                     ) -> None:
    data = bytearray(sample_bytes[: max(len(sample_bytes) - cut, 0)])
    for pos, xor in flips:
        if data:
            data[pos % len(data)] ^= xor
    path = tmp_path / "fuzz.natrace"
    path.write_bytes(bytes(data))
    with contextlib.suppress(FileFormatError):  # anything else escaping is a bug
        read_all(path)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_file_format_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "random.natrace"
    path.write_bytes(b"SQLite format 3\0" + data if data[:1] == b"S" else data)
    with contextlib.suppress(FileFormatError):  # anything else escaping is a bug
        read_all(path)


@pytest.mark.bpf
def test_record_killed_by_sigkill_keeps_its_snapshots(tmp_path: Path) -> None:
    rec = tmp_path / "killed.natrace"
    tracer = subprocess.Popen([NATRACE, "record", "--interval", "0.3", "-o", str(rec), "--",
                               str(build().leaky), "--wait", "--many", "100"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    pid = None
    try:
        deadline = time.monotonic() + 120
        snapshots = 0
        while snapshots < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
            assert tracer.poll() is None, tracer.stderr.read() if tracer.stderr else ""
            if rec.exists():
                try:
                    with sqlite3.connect(f"file:{rec}?mode=ro", uri=True) as db:
                        snapshots = db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
                        pid = int(db.execute("SELECT value FROM meta WHERE key='pid'")
                                  .fetchone()[0])
                except sqlite3.OperationalError:
                    pass  # busy: a snapshot is being written
        assert snapshots >= 3
        tracer.send_signal(signal.SIGKILL)
        tracer.wait()
    finally:
        tracer.kill()
        tracer.wait()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    proc = natrace("report", str(rec), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target_exited"] is False
    with Recording(str(rec)) as r:
        assert len(r.snapshots) >= snapshots


@pytest.mark.bpf
def test_run_leaves_a_recording_and_a_flamegraph_behind(tmp_path: Path) -> None:
    rec, flame = tmp_path / "run.natrace", tmp_path / "run.folded"
    proc = natrace("run", "--json", "-o", str(tmp_path / "r.json"), "--record", str(rec),
                   "--flamegraph", str(flame), "--", str(build().leaky))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert rec.stat().st_mode & 0o777 == 0o600 and flame.stat().st_mode & 0o777 == 0o600
    replay = json.loads(natrace("report", str(rec), "--json").stdout)
    assert replay["sites"] == report["sites"]
    assert replay["totals"] == report["totals"]
    assert sum(int(line.rpartition(" ")[2]) for line in flame.read_text().splitlines()) == \
        report["totals"]["bytes"]


def test_bad_flamegraph_name_fails_before_tracing() -> None:
    proc = natrace("run", "--flamegraph", "out.zip", "--", "true")
    assert proc.returncode == 2
    assert "cannot tell the flamegraph format" in proc.stderr


def test_addresses_above_two_to_the_63_round_trip(tmp_path: Path) -> None:
    """Addresses and offsets at or above 2**63 (the vsyscall page 0xffffffffff600000):
    SQLite's INTEGER is signed, so they are stored in two's complement and read back
    whole."""
    high = Frame(0xFFFF_FFFF_FF60_0000, "/opt/app/bin/app", 0xFFFF_FFFF_FF60_0000)
    snap = Snapshot(pid=1, command="x", taken_at=0.0, duration=1.0,
                    sites=[Site("malloc", [high], 10, 1)])
    path = tmp_path / "r.natrace"
    with RecordingWriter(str(path), {}) as writer:
        writer.add(snap)
    with Recording(str(path)) as rec:
        frame = rec.snapshot().sites[0].frames[0]
    assert (frame.address, frame.module_offset) == (high.address, high.module_offset)
