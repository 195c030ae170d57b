"""Running natrace against fixtures from the tests: the CLI as a subprocess, a fixture
held at its `--wait` gate, and a check that no probe is left in a process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from framecheck import seen

NATRACE = str(Path(sys.executable).with_name("natrace"))


@contextmanager
def waiting(*argv: str) -> Iterator[subprocess.Popen[str]]:
    """A fixture started with --wait: it has printed `ready <pid>` and waits for a byte
    on stdin to do its work (`release`); killed at the end."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        yield proc
    finally:
        proc.kill()
        proc.wait()


def release(proc: subprocess.Popen[str], expect_ready: bool = False) -> None:
    """Let a waiting fixture work, and wait until it says `done` (after `ready <pid>`
    first when `expect_ready`: a fixture natrace launched)."""
    assert proc.stdin is not None and proc.stdout is not None
    if expect_ready:
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
    proc.stdin.write("x")
    proc.stdin.flush()
    line = proc.stdout.readline().strip()
    assert line == "done", line


def attach(pid: int, *args: str) -> subprocess.Popen[str]:
    """`natrace snapshot -p PID ARGS`, returned once it says its probes are in place."""
    tracer = subprocess.Popen([NATRACE, "snapshot", "-p", str(pid), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    line = tracer.stderr.readline()
    if "attached to PID" not in line:
        tracer.kill()
        raise AssertionError(line + tracer.stderr.read())
    return tracer


def patched_code_bytes(pid: int) -> int:
    """Bytes of the process's executable file mappings that differ from the files:
    the int3 breakpoints of uprobes still installed (0 once every probe is gone)."""
    differ = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            mem.seek(start)
            live = mem.read(end - start)
            with open(parts[5], "rb") as fh:
                fh.seek(int(parts[2], 16))
                disk = fh.read(end - start)
            for off in range(0, len(live), 4096):  # compare pages, then bytes
                if live[off:off + 4096] != disk[off:off + 4096]:
                    differ += sum(a != b for a, b in zip(live[off:off + 4096],
                                                         disk[off:off + 4096]))
    return differ


def snapshot_json(target: subprocess.Popen[str], *args: str) -> dict[str, Any]:
    """`natrace snapshot -p` (with ARGS) on a fixture held by `waiting`: attach, let the
    fixture work, stop natrace with SIGINT once it is done; the JSON report."""
    tracer = attach(target.pid, "--duration", "10m", "--json", *args)
    release(target)
    tracer.send_signal(signal.SIGINT)  # stop early: the report is still written
    out, err = tracer.communicate(timeout=120)
    assert tracer.returncode == 0, err
    report: dict[str, Any] = seen("natrace snapshot", json.loads(out))
    return report
