"""natrace's report owns stdout: whatever a launched command prints can't corrupt it
(`--json` is one document on a pipe, with a 1 MB printer or Node.js), a non-blocking
stdout doesn't cut it, and a reader that goes away (`| head`) ends natrace quietly
with 141 (README: where the target's output goes; exit codes)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import stat
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from framecheck import seen
from tracing import NATRACE

SEQ = 160_000  # `seq 160000` prints 1,008,895 bytes
NODE_SCRIPT = """
const line = 'n'.repeat(1023) + '\\n';
process.stdout.write(line.repeat(1024));
"""


def natrace_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("natrace")]


@pytest.mark.bpf
def test_json_on_a_pipe_is_one_document_when_the_target_prints_a_megabyte() -> None:
    proc = subprocess.run([NATRACE, "run", "--json", "--", "seq", str(SEQ)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = seen("natrace run", json.loads(proc.stdout))  # the whole stdout is one document
    assert report["command"] == f"/usr/bin/seq {SEQ}" and report["target_exited"]
    printed = [line for line in proc.stderr.splitlines() if not line.startswith("natrace")]
    assert printed == [str(i) for i in range(1, SEQ + 1)]  # seq's output, on stderr, whole
    assert len("\n".join(printed)) + 1 == 1_008_895


@pytest.mark.bpf
def test_json_on_a_pipe_is_whole_with_a_nodejs_target(tmp_path: Path) -> None:
    """node makes the stdout it is given non-blocking; the report cut at 64 KiB with exit 0
    before. Its output goes to natrace's stderr, the report stays whole."""
    script = tmp_path / "print.js"
    script.write_text(NODE_SCRIPT)
    proc = subprocess.run([NATRACE, "run", "--json", "--top", "1000", "--", "/usr/bin/node",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout) > 64 << 10
    report = seen("natrace run", json.loads(proc.stdout))
    assert report["target_exited"] and report["sites"]
    assert proc.stderr.count("n" * 1023 + "\n") == 1024


def test_a_non_blocking_stdout_gets_the_whole_report(long_recording: Path) -> None:
    """stdout is a pipe set O_NONBLOCK (as node leaves a shared one) and is read only once
    it is full: natrace's writes meet EAGAIN and wait instead of failing."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    capacity = fcntl.fcntl(read_end, 1032)  # F_GETPIPE_SZ
    proc = subprocess.Popen([NATRACE, "report", str(long_recording), "--json"],
                            stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    buf = bytearray(4)
    while True:  # wait (without a clock) until natrace has filled the pipe
        select.select([read_end], [], [])
        fcntl.ioctl(read_end, termios.FIONREAD, buf)
        if int.from_bytes(buf, "little") >= capacity or proc.poll() is not None:
            break
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(b"".join(chunks))
    assert len(report["sites"]) == 3000


def test_head_on_a_long_report_ends_quietly_with_141(long_recording: Path) -> None:
    for fmt in ([], ["--json"]):
        proc = subprocess.run(["bash", "-c", f'"$0" report "$1" --top 3000 {" ".join(fmt)} '
                               '| head -3; exit "${PIPESTATUS[0]}"', NATRACE,
                               str(long_recording)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 141, proc.stderr
        assert proc.stderr == ""  # no message, no traceback
        assert len(proc.stdout.splitlines()) == 3


@pytest.mark.bpf
def test_a_closed_stdout_after_a_run_is_141_and_the_command_still_finishes(
        tmp_path: Path) -> None:
    proc = subprocess.Popen([NATRACE, "run", "--record", str(tmp_path / "r.natrace"), "--",
                             "seq", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before the report is written
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141, err
    assert natrace_lines(err) == [natrace_lines(err)[0]]  # the 'launched' line only
    assert [line for line in err.splitlines() if not line.startswith("natrace")] == \
        ["1", "2", "3"]
    assert (tmp_path / "r.natrace").stat().st_size > 0  # the other outputs were still saved


STDOUT_WRITERS = [["--version"], ["--help"], ["sampler-path"], ["doctor"],
                  ["report", "RECORDING"]]


@pytest.mark.parametrize("stdout", [">/dev/full", ">&-", "</dev/null"])
@pytest.mark.parametrize("args", STDOUT_WRITERS, ids=" ".join)
def test_a_stdout_that_takes_nothing_is_one_line_and_exit_5(
        args: list[str], stdout: str, long_recording: Path) -> None:
    """A full disk, a closed stdout (`>&-`) or a read-only one: click's own output
    (--version, --help) and every verb's fail as a report does, never 'internal error'
    or exit 0 with nothing printed."""
    argv = " ".join(str(long_recording) if a == "RECORDING" else a for a in args)
    proc = subprocess.run(["sh", "-c", f"exec {NATRACE} {argv} 1{stdout}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr == ("natrace: cannot write to stdout: No space left on device\n"
                           if stdout == ">/dev/full" else "natrace: stdout is closed or open "
                           "for reading only: redirect it (> FILE)\n")


def test_a_trace_for_a_closed_stdout_is_refused_before_the_command_runs(
        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.run(["sh", "-c", f"exec {NATRACE} run -- touch {marker} >&-"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr == ("natrace: stdout is closed or open for reading only: redirect it "
                           "(> FILE) or give -o FILE\n")
    assert not marker.exists()


@pytest.mark.bpf
def test_where_the_command_output_goes(tmp_path: Path) -> None:
    # -o FILE: stdout is free, the command keeps it
    proc = subprocess.run([NATRACE, "run", "-o", str(tmp_path / "r.txt"), "--", "seq", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1\n2\n3\n"
    assert (tmp_path / "r.txt").read_text().startswith("natrace report: PID")
    # --target-output FILE takes it, mode 0600 when natrace makes the file
    out = tmp_path / "cmd.out"
    proc = subprocess.run([NATRACE, "run", "--json", "--target-output", str(out), "--",
                           "seq", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target_exited"]
    assert out.read_text() == "1\n2\n3\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert natrace_lines(proc.stderr) == proc.stderr.splitlines()


@pytest.mark.bpf
def test_on_a_terminal_a_text_report_shares_it_with_the_command() -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([NATRACE, "run", "--", "seq", "3"], stdout=slave,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    got = bytearray()
    reader = threading.Thread(target=lambda: _drain(master, got), daemon=True)
    reader.start()
    _, err = proc.communicate(timeout=300)
    reader.join(timeout=30)
    assert proc.returncode == 0, err
    text = got.decode().replace("\r\n", "\n")
    assert "natrace report: PID" in text
    assert [line for line in text.splitlines() if line in ("1", "2", "3")] == ["1", "2", "3"]


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # EIO: every writer closed the terminal
            return
        if not chunk:
            return
        into += chunk


def test_natrace_waits_out_a_full_non_blocking_stderr(tmp_path: Path) -> None:
    """stderr is a pipe set O_NONBLOCK and already full: natrace's one-line error waits
    in poll() (seen in /proc/PID/syscall, no clock) instead of failing, and arrives whole
    once the pipe is read."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += os.write(write_end, b"f" * 4096)
    proc = subprocess.Popen([NATRACE, "report", str(tmp_path / "missing.natrace")],
                            stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    while not _waiting_in_poll(proc.pid):
        assert proc.poll() is None
        time.sleep(0.01)
    got = bytearray()
    _drain(read_end, got)
    assert proc.wait(timeout=60) == 2
    assert got[filler:].decode() == f"natrace: {tmp_path / 'missing.natrace'}: no such file\n"


def _waiting_in_poll(pid: int) -> bool:
    """The process sits in poll(2) on one descriptor with no timeout (x86-64: syscall 7)."""
    with open(f"/proc/{pid}/syscall") as fh:
        fields = fh.read().split()
    return len(fields) > 3 and fields[0] == "7" and int(fields[2], 16) == 1 \
        and int(fields[3], 16) in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
