"""Output paths as root: a device, FIFO or symlink at an output path is written through,
never replaced; a path that cannot be written is refused before any probe is attached,
for every output option (tracer/files.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from allocfixtures import build
from test_recording import snap, write
from tracing import NATRACE, waiting

from tracer.files import open_trusted
from tracer.recording import Recording


def natrace(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NATRACE, *args], capture_output=True, text=True, timeout=120,
                          check=False, **kwargs)  # type: ignore[call-overload]


def null_device(directory: Path) -> Path:
    """A character device like /dev/null (1:3) made in a test's own directory: the real
    /dev/null is never an output of these tests."""
    path = directory / "null"
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def read_fifo(path: Path) -> tuple[threading.Thread, list[bytes]]:
    """A thread that opens the FIFO and reads it to EOF (natrace's open waits for it)."""
    got: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as fh:
            got.append(fh.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    return write(tmp_path / "in.natrace", snap(1.0, 1000), snap(2.0, 3000))


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a read-only file system: even root cannot create files there."""
    path = tmp_path / "ro"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_device_fifo_and_symlinks_are_written_through(recording: Path, tmp_path: Path) -> None:
    device = null_device(tmp_path)
    device_st = os.stat(device)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    real = tmp_path / "real.json"
    real.write_text("old")
    os.chmod(real, 0o644)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made.json")
    expected = natrace("report", str(recording), "--json").stdout

    assert natrace("report", str(recording), "--json", "-o", str(device)).returncode == 0
    st = os.stat(device)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == device_st.st_rdev
    assert (st.st_ino, st.st_mode) == (device_st.st_ino, device_st.st_mode)  # not chmod'ed

    thread, got = read_fifo(fifo)
    assert natrace("report", str(recording), "--json", "-o", str(fifo)).returncode == 0
    thread.join(timeout=60)
    assert got == [expected.encode()]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)

    for path, target in ((link, real), (dangling, tmp_path / "made.json")):
        assert natrace("report", str(recording), "--json", "-o", str(path)).returncode == 0
        assert os.path.islink(path) and os.readlink(path) == str(target)
        assert target.read_text() == expected
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600  # a new file, private

    proc = natrace("report", str(recording), "--json", "-o", "/dev/stdout")
    assert proc.returncode == 0 and json.loads(proc.stdout) == json.loads(expected)
    proc = natrace("report", str(recording), "--json", "-o", "/dev/fd/2")
    assert proc.returncode == 0 and json.loads(proc.stderr) == json.loads(expected)


@pytest.mark.bpf
def test_a_traced_run_writes_its_outputs_through_a_device_a_fifo_and_a_symlink(
        tmp_path: Path) -> None:
    device = null_device(tmp_path)
    fifo = tmp_path / "flame.folded"
    os.mkfifo(fifo)
    real = tmp_path / "real.natrace"
    link = tmp_path / "link.natrace"
    link.symlink_to(real)
    thread, got = read_fifo(fifo)
    proc = natrace("run", "-o", str(device), "--flamegraph", str(fifo), "--record", str(link),
                   "--", str(build().leaky))
    assert proc.returncode == 0, proc.stderr
    thread.join(timeout=60)
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_rdev == os.makedev(1, 3)
    folded = got[0].decode()
    assert any(line.endswith(" 10000") and "leak_malloc" in line
               for line in folded.splitlines()), folded
    assert os.path.islink(link)
    with Recording(str(link)) as rec:
        sites = {s.frame.symbol: s.bytes for s in rec.snapshot().sites
                 if s.frame is not None and s.kind == "malloc"}
    assert sites["leak_malloc"] == 10_000


def test_recordings_need_a_regular_file(tmp_path: Path) -> None:
    device = null_device(tmp_path)
    proc = natrace("record", "-o", str(device), "--", "/bin/true")
    assert proc.returncode == 5
    assert proc.stderr == (f"natrace: -o {device}: is a character device: a recording is an "
                           "SQLite database and needs a regular file\n")
    assert stat.S_ISCHR(os.stat(device).st_mode)


def test_an_input_is_never_an_output(recording: Path) -> None:
    before = recording.read_bytes()
    link = recording.with_name("alias.natrace")
    link.symlink_to(recording)
    proc = natrace("report", str(recording), "-o", str(link))
    assert proc.returncode == 2
    assert proc.stderr == (f"natrace: -o {link} is an input file: choose another "
                           "output\n")
    assert recording.read_bytes() == before


BAD_PATHS = {
    "missing directory": ("/nonexistent/natrace-test/out", "directory /nonexistent/"
                          "natrace-test does not exist"),
    "read-only file system": ("RO/out", "cannot create files in RO: Read-only file "
                              "system"),
    "a directory": ("TMP", "is a directory"),
}

# (command args before the output option, option, a suffix the path needs)
OUTPUT_OPTIONS = [
    (["run"], "-o", ".txt"),
    (["run"], "--record", ".natrace"),
    (["run"], "--flamegraph", ".svg"),
    (["snapshot", "-p", "PID"], "-o", ".txt"),
    (["snapshot", "-p", "PID"], "--record", ".natrace"),
    (["snapshot", "-p", "PID"], "--flamegraph", ".html"),
    (["record"], "-o", ".natrace"),
    (["top", "-n", "1"], "-o", ".txt"),
    (["guard", "-p", "PID", "--rss-limit", "1G"], "--report-dir", ""),
]


@pytest.mark.bpf
@pytest.mark.parametrize("bad", list(BAD_PATHS))
@pytest.mark.parametrize(("command", "option", "suffix"), OUTPUT_OPTIONS,
                         ids=[f"{c[0]} {o}" for c, o, _ in OUTPUT_OPTIONS])
def test_unwritable_outputs_are_refused_before_anything_is_attached(
        command: list[str], option: str, suffix: str, bad: str, tmp_path: Path,
        readonly_dir: Path) -> None:
    path, why = BAD_PATHS[bad]
    if bad == "a directory" and option == "--report-dir":
        pytest.skip("a directory is what --report-dir wants")
    path = path.replace("RO", str(readonly_dir)).replace("TMP", str(tmp_path))
    path = path + suffix if bad != "a directory" else path
    why = why.replace("RO", str(readonly_dir))
    marker = tmp_path / "ran"
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        args = [a.replace("PID", str(sleeper.pid)) for a in command]
        launch = [] if "-p" in args else ["--", "/usr/bin/touch", str(marker)]
        proc = natrace(*args, option, path, *launch)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith(f"natrace: {option} ") and why in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1  # one line: no 'attached', no 'launched'
    assert not marker.exists()  # a launched command never ran


@pytest.mark.bpf
def test_top_saves_its_record_and_flamegraph_files_at_the_end(tmp_path: Path) -> None:
    """--record/--flamegraph on top were accepted and ignored: the last frame's state
    is saved now (batch mode here; the full-screen view saves the state on screen)."""
    record, flame = tmp_path / "top.natrace", tmp_path / "top.folded"
    with waiting(str(build().leaky), "--wait") as target:
        proc = natrace("top", "-p", str(target.pid), "-n", "1", "--interval", "0.5",
                       "--record", str(record), "--flamegraph", str(flame))
    assert proc.returncode == 0, proc.stderr
    with Recording(str(record)) as rec:
        assert rec.snapshot().pid == target.pid
    assert flame.exists() and stat.S_IMODE(flame.stat().st_mode) == 0o600


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system: a 2 MB report cannot fit."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_write_that_fails_is_exit_5_and_leaves_nothing_half_written(
        long_recording: Path, full_dir: Path) -> None:
    (full_dir / "r.json").write_text("the previous report\n")
    proc = natrace("report", str(long_recording), "--json", "-o", str(full_dir / "r.json"))
    assert proc.returncode == 5
    assert proc.stderr == (f"natrace: -o {full_dir / 'r.json'}: cannot write: No space left "
                           "on device\n")
    assert sorted(p.name for p in full_dir.iterdir()) == ["r.json"]  # no temporary left
    assert (full_dir / "r.json").read_text() == "the previous report\n"  # not replaced


def test_a_fifo_whose_reader_leaves_is_141_with_one_line(long_recording: Path,
                                                         tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def open_and_leave() -> None:
        with open(fifo, "rb"):
            pass  # gone before reading: the 2 MB report can't all fit in the pipe

    thread = threading.Thread(target=open_and_leave, daemon=True)
    thread.start()
    proc = natrace("report", str(long_recording), "--json", "-o", str(fifo))
    thread.join(timeout=60)
    assert proc.returncode == 141
    assert proc.stderr == (f"natrace: -o {fifo}: its reader closed it before everything was "
                           "written\n")


def test_a_fifo_with_no_reader_yet_is_waited_for_and_said(recording: Path,
                                                            tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([NATRACE, "report", str(recording), "-o", str(fifo)],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # said before it blocks: no reader yet
    assert line == (f"natrace: -o {fifo}: waiting for a reader of the FIFO (Ctrl-C gives "
                    "up)\n")
    with open(fifo) as reader:
        got = reader.read()
    assert proc.wait(timeout=60) == 0 and proc.stderr.read() == ""
    assert got == natrace("report", str(recording)).stdout


def test_a_fifo_at_a_cache_path_is_no_cache_entry(tmp_path: Path) -> None:
    """natrace's caches (compiled BPF, unwind rows, probe placement) read an entry only
    from a regular file: a FIFO at the path is no entry, refused without blocking (a
    plain open() for reading waits for a writer: natrace hung there). In a child
    process, so a regression fails the test instead of hanging it."""
    fifo = tmp_path / "entry"
    os.mkfifo(fifo, 0o600)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom tracer.files import open_trusted\n"
         "print(open_trusted(sys.argv[1]), open_trusted(sys.argv[1], 'rb'))", str(fifo)],
        capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "None None\n"), proc.stderr
    regular = tmp_path / "regular"
    regular.write_text("rows")
    fh = open_trusted(str(regular))
    assert fh is not None and fh.read() == "rows"
    fh.close()
