"""`natrace guard` against tests/fixtures/src/memory/grower.c: trips past a limit, writes
its report before it acts, stays quiet below the limit, stops when the target exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from memfixtures import build

NATRACE = str(Path(sys.executable).with_name("natrace"))


@contextmanager
def grower(max_mib: int, step_ms: int, signal_file: Path) -> Iterator[subprocess.Popen[str]]:
    """The fixture, started and waiting for the byte that makes it grow."""
    proc = subprocess.Popen([str(build().grower), str(max_mib), str(step_ms), str(signal_file)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start_guard(pid: int, *args: str) -> subprocess.Popen[str]:
    """`natrace guard` on PID, returned once it says it is watching."""
    guard = subprocess.Popen([NATRACE, "guard", "-p", str(pid), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert guard.stderr is not None
    line = guard.stderr.readline()
    assert "watching PID" in line, line + guard.stderr.read()
    return guard


def grow(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("x")
    proc.stdin.flush()


@pytest.mark.bpf
def test_guard_trips_writes_the_report_then_signals(tmp_path: Path) -> None:
    signal_file = tmp_path / "signalled"
    reports = tmp_path / "reports"
    with grower(400, 20, signal_file) as proc:
        guard = start_guard(proc.pid, "--rss-limit", "96M", "--action", "signal:USR1",
                            "--report-dir", str(reports), "--interval", "0.25", "--json")
        grow(proc)
        _, err = guard.communicate(timeout=180)
        assert guard.returncode == 6, err  # tripped
        assert proc.wait(timeout=30) == 0  # it got SIGUSR1 and wrote the time
    files = list(reports.iterdir())
    assert len(files) == 1, err
    report_file = files[0]
    assert report_file.stat().st_mode & 0o777 == 0o600
    report = json.loads(report_file.read_text())
    assert "over the limit 96.0 MiB" in report["guard"]["reason"]
    user = [s for s in report["sites"] if not s["allocator_internal"]]
    assert user[0]["function"] == "grow_heap", [s["label"] for s in user[:3]]
    assert report["memory"]["timeline"][-1]["rss"] > 96 << 20
    assert report["memory"]["regions"]["count"] > 0
    signalled_at = float(signal_file.read_text())
    assert report_file.stat().st_mtime <= signalled_at  # the report first, then the action
    assert "sent SIGUSR1" in err


def test_guard_below_the_limit_does_nothing_and_stops_when_the_target_exits(
        tmp_path: Path) -> None:
    signal_file = tmp_path / "signalled"
    reports = tmp_path / "reports"
    with grower(16, 5, signal_file) as proc:
        guard = start_guard(proc.pid, "--rss-limit", "1GiB", "--growth", "512M/1s",
                            "--action", "kill", "--report-dir", str(reports), "--interval",
                            "0.1", "--no-trace")
        grow(proc)
        time.sleep(1.5)
        assert proc.poll() is None  # never signalled
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        _, err = guard.communicate(timeout=30)
    assert guard.returncode == 0, err
    assert f"PID {proc.pid} exited; no limit tripped" in err
    assert list(reports.iterdir()) == []
    assert not signal_file.exists()


def test_growth_limit_trips_and_kill_ends_the_target(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    with grower(400, 10, tmp_path / "signalled") as proc:
        guard = start_guard(proc.pid, "--growth", "20M/1s", "--action", "kill", "--grace", "2",
                            "--report-dir", str(reports), "--interval", "0.2", "--no-trace")
        grow(proc)
        _, err = guard.communicate(timeout=60)
        assert guard.returncode == 6, err  # tripped
        assert proc.wait(timeout=10) == -signal.SIGTERM  # SIGTERM sufficed
    assert "RSS grew" in err and "ended after SIGTERM" in err
    (report,) = reports.iterdir()
    text = report.read_text()
    assert text.startswith("natrace guard: RSS grew")
    assert "Regions:" in text and "Where RSS goes" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--rss-limit", "12Q"], "--rss-limit: not a size: '12Q'"),
    (["--growth", "10M"], "--growth: not a duration"),
    (["--rss-limit", "1G", "--action", "signal:NOPE"], "unknown signal 'NOPE'"),
    (["--rss-limit", "1G", "--action", "explode"], "is not report, kill or signal:NAME"),
    ([], "give --rss-limit SIZE and/or --growth SIZE/INTERVAL"),
])
def test_bad_values_are_one_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run([NATRACE, "guard", "-p", str(os.getpid()), *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_guard_on_a_missing_pid_fails_cleanly() -> None:
    proc = subprocess.run([NATRACE, "guard", "-p", "999999999", "--rss-limit", "1G",
                           "--no-trace"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert proc.stderr.strip() == ("natrace: no process with PID 999999999: check the PID "
                                   "with ps")
