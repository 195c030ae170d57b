"""`natrace top` against a live process that leaks steadily and churns (fixtures/src/grower.c).

The app is driven headless (Textual's pilot) with real probes; one test reads the real
terminal through tmux; one reads the batch frames printed when stdout is no terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracer.engine.live import LiveDriver
from tracer.engine.session import Session, SessionOptions
from tracer.probes import target as targets
from tracer.tui.app import TopApp
from tracer.tui.views import SUSPECT, Row

pytestmark = pytest.mark.bpf

NATRACE = str(Path(sys.executable).with_name("natrace"))
SRC = Path(__file__).parent / "fixtures" / "src" / "grower.c"
BUILD = Path(__file__).parent / "fixtures" / "build" / "top"
SYMBOL = 6  # the sites view's SYMBOL column


@pytest.fixture(scope="module")
def grower() -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    exe = BUILD / "grower"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(exe), str(SRC)],
                   check=True, capture_output=True)
    return exe


@pytest.fixture
def running(grower: Path) -> Iterator[subprocess.Popen[str]]:
    """grower started by the test (natrace attaches with -p), killed afterwards."""
    proc = subprocess.Popen([str(grower)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
    yield proc
    proc.kill()
    proc.wait()


def perf_event_fds() -> int:
    """Open perf events of this process: every attached uprobe holds one."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"
    return count


def bcc_uprobe_events(pid: int) -> list[str]:
    for path in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        if os.path.exists(path):
            with open(path) as fh:
                return [line for line in fh if f"bcc_{pid}" in line or "grower" in line]
    return []


def state_of(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def symbols(rows: list[Row]) -> list[str]:
    return [r.cells[SYMBOL] for r in rows]


def row_of(rows: list[Row], symbol: str) -> Row:
    return next(r for r in rows if r.cells[SYMBOL] == symbol)


def test_app_ranks_the_leak_first_and_keys_work(grower: Path) -> None:
    """Launched (so the 8 MiB cache made at start is seen): the steady leak is on top and a
    suspect; the bigger cache and the churning buffer are not; sort, filter, pause, stack
    and quit do what they say; quitting detaches every probe and the target runs on."""
    baseline = perf_event_fds()
    target = targets.launch([str(grower)])
    session = Session(target, SessionOptions())
    try:
        session.start()
        assert perf_event_fds() > baseline
        app = TopApp(LiveDriver(session, 0.5), lambda _state, _what: "written")
        asyncio.run(drive(app))
        app.stop_driver()
        assert app._thread is not None and not app._thread.is_alive()
        session.close()
        assert perf_event_fds() == baseline
        assert bcc_uprobe_events(os.getpid()) == []
        time.sleep(0.3)
        assert target.alive() and state_of(target.pid) in "RS"
    finally:
        session.close()
        target.terminate()


async def drive(app: TopApp) -> None:
    async with app.run_test(size=(80, 24)) as pilot:
        deadline = time.monotonic() + 60
        while not (app.state and app.state.suspects) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await pilot.pause(1.2)  # a few more samples: churn and cache have several points
        rows = app.shown
        assert rows[0].cells[SYMBOL] == "leak_steadily" and rows[0].cells[0] == SUSPECT, \
            [r.cells for r in rows]
        assert row_of(rows, "hold_cache").cells[0] == ""  # 8 MiB, bigger, flat
        assert row_of(rows, "churn_buffer").cells[0] == ""  # 4 MiB, churned
        assert [r.cells[SYMBOL] for r in rows if r.cells[0] == SUSPECT] == ["leak_steadily"]

        await pilot.press("s", "s")  # sort by unfreed bytes
        assert app.sort_column == 1
        by_bytes = [r.sort[1] for r in app.shown]
        assert by_bytes == sorted(by_bytes, reverse=True)
        # (whether the cache still outweighs the leak depends on how long the machine
        # took to get here: the order itself is what sorting promises)
        await pilot.press(*"s" * 6)  # back to the ranking
        assert app.sort_column is None

        await pilot.press("slash")
        await pilot.pause(0.3)
        await pilot.press(*"churn", "enter")
        await pilot.pause(0.3)
        assert symbols(app.shown) == ["churn_buffer"]
        await pilot.press("slash")
        await pilot.pause(0.3)
        await pilot.press(*"module:grower", "enter")  # libc's own sites are charged to
        await pilot.pause(0.3)                          # their callers in grower now
        assert app.shown and all(r.module == "grower" for r in app.shown), \
            [r.module for r in app.shown]
        await pilot.press("slash")
        await pilot.pause(0.3)
        await pilot.press("ctrl+u", "enter")  # clear the filter
        await pilot.pause(0.3)
        assert "leak_steadily" in symbols(app.shown)

        await pilot.press("p")
        frozen = app.state
        leak_bytes = row_of(app.shown, "leak_steadily").cells[1]
        await pilot.pause(1.5)
        assert app.state is frozen and app.latest is not frozen
        assert row_of(app.shown, "leak_steadily").cells[1] == leak_bytes
        await pilot.press("p")
        assert app.state is app.latest
        assert row_of(app.shown, "leak_steadily").cells[1] != leak_bytes

        app.query_one("DataTable").move_cursor(row=0)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause(0.3)
        frames = str(app.screen.query_one("#stack-frames").render())
        assert "=> #0  leak_steadily" in frames and "main" in frames, frames
        await pilot.press("escape")

        await pilot.press("2")
        assert "grower" in [r.cells[0] for r in app.shown]
        await pilot.press("5")
        assert any("heap" in r.cells[-1] for r in app.shown)
        await pilot.press("1", "q")
    assert app.driver is not None and app.driver._stop.is_set()


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen_until(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{text!r} never appeared on screen:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_real_terminal_80x24_no_color(running: subprocess.Popen[str], tmp_path: Path) -> None:
    name = f"natrace-top-{os.getpid()}"
    done = tmp_path / "exited"
    command = (f"cd {tmp_path} && NO_COLOR=1 {NATRACE} top -p {running.pid} --interval 500ms;"
               f" echo $? > {done}; sleep 30")
    tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24", command)
    try:
        screen = screen_until(name, SUSPECT, 60)
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert f"PID {running.pid}" in screen and "RSS" in screen and "Quit" in screen
        leak = next(line for line in lines if "leak_steadily" in line)
        assert SUSPECT in leak
        tmux("send-keys", "-t", name, "/")
        screen_until(name, "Filter rows", 10)
        tmux("send-keys", "-t", name, "churn", "Enter")
        screen = screen_until(name, "filter churn", 10)
        assert "leak_steadily" not in screen
        tmux("send-keys", "-t", name, "w")
        screen_until(name, "wrote", 10)
        tmux("send-keys", "-t", name, "q")
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists() and done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    reports = list(tmp_path.glob(f"natrace-top-{running.pid}-*.txt"))
    assert len(reports) == 1 and "leak_steadily" in reports[0].read_text()
    assert reports[0].stat().st_mode & 0o777 == 0o600
    time.sleep(0.3)
    assert running.poll() is None and state_of(running.pid) in "RS"
    assert bcc_uprobe_events(running.pid) == []


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_closing_the_terminal_ends_top(running: subprocess.Popen[str], tmp_path: Path) -> None:
    """The terminal goes away (SIGHUP): top ends, detached, instead of tracing on unseen."""
    name = f"natrace-top-hup-{os.getpid()}"
    tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24",
         f"cd {tmp_path} && NO_COLOR=1 {NATRACE} top -p {running.pid} --interval 500ms")
    try:
        screen_until(name, SUSPECT, 60)
        top = int(tmux("list-panes", "-t", name, "-F", "#{pane_pid}").split()[0])
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{top}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{top}").exists(), "natrace top outlived its terminal"
    assert running.poll() is None and state_of(running.pid) in "RS"


def test_batch_mode_prints_frames_when_stdout_is_no_terminal(
        running: subprocess.Popen[str]) -> None:
    proc = subprocess.run([NATRACE, "top", "-p", str(running.pid), "--iterations", "2",
                           "--interval", "1s"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = proc.stdout.split("natrace top - ")[1:]
    assert len(frames) == 2, proc.stdout
    assert all(f"PID {running.pid}" in frame and "RSS" in frame for frame in frames)
    assert "UNFREED" in frames[-1] and "leak_steadily" in frames[-1], frames[-1]
    assert "\x1b[" not in proc.stdout  # plain text, no escape codes
    assert running.poll() is None
