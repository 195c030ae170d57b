"""`natrace top` against a live process that leaks steadily and churns (fixtures/src/grower.c).

The app is driven headless (Textual's pilot) with real probes; one test reads the real
terminal through tmux; one reads the batch frames printed when stdout is no terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import build_trees

from tracer.engine.live import LiveDriver, LiveState
from tracer.engine.session import Session, SessionOptions
from tracer.probes import target as targets
from tracer.recording import Recording
from tracer.tui.app import TopApp
from tracer.tui.views import SUSPECT, Row, modules_table

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


def probe_fds() -> int:
    """This process's probe descriptors: every attached probe holds a BPF link (a
    perf event beside another tool's bcc probe)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") in ("anon_inode:[perf_event]",
                                                           "anon_inode:bpf_link")
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
    baseline = probe_fds()
    target = targets.launch([str(grower)])
    session = Session(target, SessionOptions())
    try:
        session.start()
        assert probe_fds() > baseline
        app = TopApp(LiveDriver(session, 0.5), lambda _state, _what: "written")
        asyncio.run(drive(app))
        app.stop_driver()
        assert app._thread is not None and not app._thread.is_alive()
        session.close()
        assert probe_fds() == baseline
        assert bcc_uprobe_events(os.getpid()) == []
        time.sleep(0.3)
        assert target.alive() and state_of(target.pid) in "RS"
    finally:
        session.close()
        target.terminate()


def test_a_process_tree_shows_each_function_once_with_its_sum() -> None:
    """Launched, top follows the forker's two workers (fixtures/src/forker.c): each
    function is one row with its figures summed over the processes, as its growth is
    fitted — the table has one row per key (the same function in two processes as two
    rows with one key crashed the app)."""
    target = targets.launch([str(build_trees().forker)])
    session = Session(target, SessionOptions())
    try:
        session.start()
        app = TopApp(LiveDriver(session, 0.2), lambda _state, _what: "written")
        asyncio.run(drive_to_end(app))
        app.stop_driver()
        # the driver thread closed the session at the end (a signal handler put back
        # off the main thread killed it: the app waited for its first state forever)
        assert app.state is not None and app.state.ended
        rows = {r.cells[SYMBOL]: r.cells[1:4] for r in app.shown}
        assert rows["worker_leak (2 processes)"] == ("4,608 B", "9", "23")  # 3+6 x 512 B
        assert rows["parent_leak"] == ("4,000 B", "4", "4")
        assert len(app.shown) == len({r.key for r in app.shown})
        [own] = [r for r in modules_table(app.state).rows if r.key == "forker"]
        assert own.cells[1:3] == ("8,608 B", "13")  # 4 x 1000 + 9 x 512 B
    finally:
        session.close()
        target.terminate()


class FailingDriver(LiveDriver):
    """A driver whose second poll fails, standing for any failure in the driver thread."""

    def next_state(self) -> LiveState | None:
        if getattr(self, "_shown", False):
            raise OSError(5, "Input/output error")
        self._shown = True
        return super().next_state()


def test_a_failure_in_the_driver_thread_ends_the_app_as_its_crash(grower: Path) -> None:
    """It used to kill only the thread: the view froze on its last state and `q` exited 0."""
    target = targets.launch([str(grower)])
    session = Session(target, SessionOptions())
    try:
        session.start()
        app = TopApp(FailingDriver(session, 0.3), lambda _state, _what: "written")

        async def wait_for_the_end() -> None:
            async with app.run_test(size=(80, 24)) as pilot:
                deadline = time.monotonic() + 60
                while app.is_running and time.monotonic() < deadline:
                    await pilot.pause(0.2)

        asyncio.run(wait_for_the_end())
        app.stop_driver()
        assert isinstance(app.crash, OSError) and app.crash.errno == 5
        assert app.state is not None  # the first state was shown: top saves it
        assert app._thread is not None and not app._thread.is_alive()
    finally:
        session.close()
        target.terminate()


async def drive_to_end(app: TopApp) -> None:
    async with app.run_test(size=(120, 40)) as pilot:
        deadline = time.monotonic() + 60
        while not (app.state and app.state.ended) and time.monotonic() < deadline:
            await pilot.pause(0.2)
        await pilot.pause(0.3)
        await pilot.press("q")


async def until(pilot: Any, done: Callable[[], bool]) -> None:
    """Let the app run until `done()` holds: the driver's states come at the machine's
    pace, not at the interval (60 s only guards against a hang)."""
    deadline = time.monotonic() + 60
    while not done() and time.monotonic() < deadline:
        await pilot.pause(0.2)
    assert done()


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
        await until(pilot, lambda: app.latest is not frozen)  # a state came meanwhile
        assert app.state is frozen
        assert row_of(app.shown, "leak_steadily").cells[1] == leak_bytes
        await pilot.press("p")
        assert app.state is app.latest
        # the leak grows 64 KiB every 100 ms: the next state on shows more
        await until(pilot, lambda: row_of(app.shown, "leak_steadily").cells[1] != leak_bytes)

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


def screen_until(session: str, text: str) -> str:
    """The terminal's text once `text` is on it (60 s only guards against a hang: a
    loaded machine redraws when it can)."""
    deadline = time.monotonic() + 60
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
        screen = screen_until(name, SUSPECT)
        lines = screen.splitlines()
        assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
        assert f"PID {running.pid}" in screen and "RSS" in screen and "Quit" in screen
        leak = next(line for line in lines if "leak_steadily" in line)
        assert SUSPECT in leak
        tmux("send-keys", "-t", name, "/")
        screen_until(name, "Filter rows")
        tmux("send-keys", "-t", name, "churn", "Enter")
        screen = screen_until(name, "filter churn")
        assert "leak_steadily" not in screen
        tmux("send-keys", "-t", name, "w")
        screen_until(name, "wrote")
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


def in_terminal(command: str, columns: int, rows: int) -> tuple[subprocess.Popen[bytes], int]:
    """`sh -c command` as the session leader of a new terminal (a pty of our own, so the
    test decides when its output is read and when it hangs up): the process and the
    terminal's master side."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(["sh", "-c", command], stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    return proc, master


def read_until(master: int, text: bytes) -> None:
    seen = b""
    deadline = time.monotonic() + 60  # only against a hang
    while text not in seen and time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            seen = seen[-4096:] + os.read(master, 65536)
    assert text in seen, f"{text!r} never reached the terminal"


@pytest.mark.parametrize("started", ["by the terminal", "from a shell",
                                     "from a shell that outlives the hang-up"])
def test_closing_the_terminal_ends_top(running: subprocess.Popen[str], tmp_path: Path,
                                       started: str) -> None:
    """The terminal goes away (EIO on every write; SIGHUP and SIGCONT for the session's
    leader, and for top once a leading shell has gone): top ends, detached, its --record
    file saved, instead of tracing on unseen. Under a shell that lives on (here one that
    ignores SIGHUP) no signal comes at all: Textual's writer thread died on the first
    failed write, the redraws filled its queue and top blocked there for good, the
    probes left in place, the recording never written."""
    rec = tmp_path / "top.natrace"
    top_cmd = f"{NATRACE} top -p {running.pid} --interval 100ms --record {rec}"
    command = {"by the terminal": f"cd {tmp_path} && exec {top_cmd}",
               "from a shell": f"cd {tmp_path} && {top_cmd}; sleep 60",
               "from a shell that outlives the hang-up":
                   f"trap '' HUP; cd {tmp_path} && {top_cmd}; sleep 60"}[started]
    shell, master = in_terminal(f"NO_COLOR=1 {command}", 160, 48)
    try:
        read_until(master, SUSPECT.encode())
        top = shell.pid if started == "by the terminal" else children(shell.pid)[0]
    finally:
        os.close(master)  # the hang-up
    deadline = time.monotonic() + 60  # only against a hang
    while not ended(top) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ended(top), "natrace top outlived its terminal"
    shell.kill()
    shell.wait()
    assert running.poll() is None and state_of(running.pid) in "RS"
    with Recording(str(rec)) as recording:  # the last state shown, saved
        assert recording.snapshot().pid == running.pid


def ended(pid: int) -> bool:
    """Exited: gone, or a zombie its parent (the test, for a shell it exec'd) has not reaped."""
    try:
        return state_of(pid) == "Z"
    except FileNotFoundError:
        return True


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def top_in_terminal(name: str, env: str, pid: int, tmp_path: Path,
                    until: str | None = None) -> tuple[int, str]:
    """`natrace top -p PID --record` in an 80-column tmux terminal, quit with q once
    `until` is on screen (or left to end by itself): its exit code, and the terminal's
    text afterwards (wrapped lines joined)."""
    done = tmp_path / "exited"
    tmux("new-session", "-d", "-s", name, "-x", "80", "-y", "24",
         f"cd {tmp_path} && {env} NO_COLOR=1 {NATRACE} top -p {pid} --interval 500ms "
         f"--record {tmp_path / 'top.natrace'}; echo $? > {done}; sleep 30")
    try:
        if until is not None:
            screen_until(name, until)
            tmux("send-keys", "-t", name, "q")
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists()
        return int(done.read_text()), tmux("capture-pane", "-p", "-J", "-t", name)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_a_crash_inside_the_app_is_one_line_exit_1_and_the_recording_is_kept(
        running: subprocess.Popen[str], tmp_path: Path) -> None:
    """Textual's screenshot timer (TEXTUAL_SCREENSHOT) failing inside the app stands for
    any bug there: it used to print a screenful of traceback and exit 0."""
    code, screen = top_in_terminal(
        f"natrace-top-crash-{os.getpid()}",
        "TEXTUAL_SCREENSHOT=1 TEXTUAL_SCREENSHOT_LOCATION=/nonexistent", running.pid,
        tmp_path)
    assert code == 1
    lines = [line for line in screen.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "natrace: internal error: FileNotFoundError: [Errno 2] No such file or directory: "
        "'/nonexistent/"), screen
    assert lines[0].endswith("(rerun with --debug for the traceback, and please report it)")
    with Recording(str(tmp_path / "top.natrace")) as rec:  # the last state shown, saved
        assert rec.snapshot().pid == running.pid
    assert running.poll() is None and bcc_uprobe_events(running.pid) == []


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_a_command_line_with_markup_is_shown_as_text(grower: Path, tmp_path: Path) -> None:
    """`[/x]` in the target's command line was read as a closing tag: the app crashed."""
    proc = subprocess.Popen(["[/x]", "one", "[b]two"], executable=str(grower),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        code, _ = top_in_terminal(f"natrace-top-markup-{os.getpid()}", "", proc.pid,
                                  tmp_path, until="cmd [/x] one [b]two")
    finally:
        proc.kill()
        proc.wait()
    assert code == 0


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
