"""Driving a workload through its gate protocol (bench/workloads/gate.h) and
watching a tracer's output for the line that says its probes are in place."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO


class BenchError(RuntimeError):
    """A run that did not complete: reported in its table cell, never hidden."""


def wait_attached(natrace: subprocess.Popen[str]) -> None:
    """Read natrace's stderr until it says its probes are in place (a SystemExit with
    its last line if it never does)."""
    assert natrace.stderr
    last = ""
    for last in natrace.stderr:
        if "attached to" in last:
            return
    raise SystemExit(f"natrace did not attach: {last.strip()}")


_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Become the reaper of our descendants' orphans, so reap_orphans() can wait for
    them: natrace's detach helper outlives natrace, holding its probes until it exits."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans(timeout: float = 30.0) -> None:
    """Wait until every child of ours has exited (a run's own are reaped already; what
    is left was adopted). A tool's probes must be gone before the next tool's start:
    a probe left in place would slow the next tool's runs (and stock memleak-bpfcc
    cannot attach beside one: bench/memleak.py)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)


class LineReader:
    """Reads a stream on a thread; every line kept with its arrival time."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._cursor = 0
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._queue.put((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
        self._queue.put(None)

    def wait_for(self, test: str, timeout: float, after: float = 0.0) -> tuple[float, str]:
        """The next line containing `test` that arrived after `after`."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.lines):
                t, line = self.lines[self._cursor]
                self._cursor += 1
                if test in line and t >= after:
                    return t, line
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:g} s waiting for {test!r}")
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if item is None:
                raise BenchError(f"stream closed before {test!r}: {self.tail()}")
            self.lines.append(item)

    def tail(self, n: int = 3) -> str:
        while not self._queue.empty():
            item = self._queue.get()
            if item is not None:
                self.lines.append(item)
        return " | ".join(line for _, line in self.lines[-n:])

    def text_between(self, start: float, end: float) -> str:
        return "\n".join(line for t, line in self.lines if start <= t < end) + "\n"


@dataclass(frozen=True)
class Usage:
    """What a finished process cost: CPU seconds and peak RSS (its own, via wait4)."""

    cpu_s: float
    max_rss_mib: float
    exit_code: int


class Proc:
    """A child process with line readers on stdout and stderr."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})})
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self.out = LineReader(self.popen.stdout)
        self.err = LineReader(self.popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, signum: int) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def reap(self, timeout: float) -> Usage:
        """Wait for exit (SIGKILL after `timeout`) and return the process's own usage."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                pid, status, ru = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        return Usage(ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, self.popen.returncode)

    def cpu_s(self) -> float:
        """CPU the process has used so far, all its threads (schedstat: ns precision,
        where /proc/PID/stat counts 10 ms ticks); 0 once it has gone."""
        total = 0
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{self.pid}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0])
        return total / 1e9

    def wait_idle(self, share: float, window: float, timeout: float) -> float:
        """Wait until the process uses at most `share` of a CPU over `window` seconds
        (a tracer done with its attach-time work); the seconds waited. A process that
        never settles within `timeout` is a BenchError: its cost is no steady cost."""
        began = time.monotonic()
        last = self.cpu_s()
        while True:
            time.sleep(window)
            now = self.cpu_s()
            if now - last <= share * window:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise BenchError(f"still using {(now - last) / window:.0%} of a CPU "
                                 f"{timeout:g} s after attaching")
            last = now

    def kill(self) -> None:
        """Make sure the process is gone (cleanup after a failed run)."""
        if self.popen.returncode is None:
            self.signal(signal.SIGKILL)
            self.reap(5)


class Workload(Proc):
    """A workload process: ready -> go -> hot_ns= calls= -> idle -> finish."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        super().__init__(argv, env, stdin=True)
        self.hot_fields: dict[str, str] = {}  # every key=value of the hot_ns= line

    def ready(self, timeout: float) -> tuple[float, int]:
        """Wait for the 'ready pid=N' line: (when, N)."""
        t, line = self.out.wait_for("ready pid=", timeout)
        return t, int(line.split("ready pid=", 1)[1].split()[0])

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"g")
        self.popen.stdin.flush()

    def hot(self, timeout: float) -> tuple[int, int]:
        """(hot-phase ns, calls), then wait until it has tidied up and is idle."""
        _, line = self.out.wait_for("hot_ns=", timeout)
        fields = self.hot_fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        self.out.wait_for("idle", 60)
        return int(fields["hot_ns"]), int(fields["calls"])

    def finish(self, timeout: float = 60) -> Usage:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(b"g")
            self.popen.stdin.close()
        except BrokenPipeError:
            pass
        return self.reap(timeout)

