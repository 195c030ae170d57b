"""What a user waits for, and natrace's own memory: the targets of issue 21.

    sudo .venv/bin/python -m bench.latency [--rounds 3] [--no-loaded | --no-idle]
                                           [--only floor,snapshot,cold,run,top]

Attach (command start to probes in place) with a warm cache, with a cold cache of
compiled BPF programs only, and as a first run with every cache cold (symbol indexes
and unwind rows too), with natrace's CPU seconds at that point (load-independent);
`natrace run` of a trivial command (wall); end of the window (SIGINT) to the report's
first line and to the command's return; `q` in top's full screen to its exit;
and natrace's own peak RSS (VmHWM of its process, sampled every 20 ms; the compiling
child of a cold start is not natrace's process and is shown apart) in every mode
against the empty-probe floor's + 15 MiB. Each figure is the median of `--rounds`
runs, measured idle (the machine as it is) and loaded (one busy loop per CPU started
here), with the 1-minute load average at the time. Markdown on stdout. Per-call cost
and 2-thread scaling come from `python -m bench` (its "Targets (issue 21)" table).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pty
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Proc, Workload
from bench.workloads import build

NATRACE = str(Path(sys.executable).with_name("natrace"))
REPO = Path(__file__).resolve().parent.parent
RSS_MARGIN_MIB = 15.0
LIMITS = {  # seconds
    "attach, warm cache": 1.0,
    "attach, cold BPF cache": 2.0,
    "attach, first run (every cache cold)": 2.0,
    "run of a trivial command (wall)": 1.5,
    "end of window to report": 1.0,
    "end of window to command return": 2.0,
    "top: q to exit": 1.0,
}
MODES = {  # natrace's own peak RSS is checked in each
    "snapshot full": ["--duration", "24h"],
    "snapshot --sample 512K": ["--duration", "24h", "--sample", "512K"],
    "snapshot --no-allocs": ["--duration", "24h", "--no-allocs"],
}


@dataclass
class Figure:
    """One measured quantity over rounds: values and the 1-minute load at each."""

    values: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)
        self.loads.append(os.getloadavg()[0])

    @property
    def median(self) -> float:
        return statistics.median(self.values)


class PeakRss:
    """VmHWM of one process, sampled until it exits (its own pages only, no children)."""

    def __init__(self, pid: int) -> None:
        self.mib = 0.0
        self._path = f"/proc/{pid}/status"
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                with open(self._path) as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            self.mib = max(self.mib, int(line.split()[1]) / 1024)
            except (OSError, ValueError):
                return
            time.sleep(0.02)


@contextlib.contextmanager
def busy_cpus(n: int) -> Iterator[None]:
    """`n` busy loops (the loaded runs); none for n == 0."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0 if hogs else 0.0)
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _workload() -> list[str]:
    """malloc_heavy, small: a target whose hot phase fills natrace's maps in seconds."""
    return [str(build() / "malloc_heavy"), "200000", "1000", "1"]


def snapshot_round(args: list[str], figures: dict[str, Figure], attach_key: str,
                   env: dict[str, str] | None = None) -> float:
    """Attach to a target held at its gate, let it work, SIGINT: the window ends.
    Fills the attach, report and return figures; returns natrace's peak RSS (MiB)."""
    wp = Workload(_workload())
    tracer = None
    try:
        _, pid = wp.ready(60)
        t0 = time.monotonic()
        tracer = Proc([NATRACE, "snapshot", "-p", str(pid), *args], env=env)
        peak = PeakRss(tracer.pid)
        attached, _ = tracer.err.wait_for("natrace: attached to", 300)
        figures[attach_key].add(attached - t0)
        figures[f"CPU s to {attach_key}"].add(_cpu_seconds(tracer.pid))
        wp.go()
        wp.hot(600)
        end = time.monotonic()
        tracer.signal(signal.SIGINT)
        reported, _ = tracer.out.wait_for("", 120)
        usage = tracer.reap(120)
        returned = time.monotonic()
        if usage.exit_code != 0:
            raise RuntimeError(f"natrace exited {usage.exit_code}: {tracer.err.tail()}")
        figures["end of window to report"].add(reported - end)
        figures["end of window to command return"].add(returned - end)
        if attach_key != "attach, warm cache":
            figures[f"{attach_key}: natrace and its compiling children, peak RSS MiB"].add(
                usage.max_rss_mib)
        wp.finish()
        return peak.mib
    finally:
        if tracer is not None:
            tracer.kill()
        wp.kill()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (system time includes the kernel's
    verifying of loaded programs): what attaching costs whatever the machine's load."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(figures: dict[str, Figure]) -> float:
    """`natrace run -- true`, wall time; natrace's peak RSS."""
    t0 = time.monotonic()
    proc = Proc([NATRACE, "run", "--", "true"])
    peak = PeakRss(proc.pid)
    usage = proc.reap(120)
    if usage.exit_code != 0:
        raise RuntimeError(f"natrace run exited {usage.exit_code}: {proc.err.tail()}")
    figures["run of a trivial command (wall)"].add(time.monotonic() - t0)
    return peak.mib


def top_round(figures: dict[str, Figure]) -> float:
    """`natrace top -p PID` full screen on a pseudo-terminal: `q` once it has drawn."""
    wp = Workload(_workload())
    try:
        _, pid = wp.ready(60)
        child, fd = pty.fork()
        if child == 0:
            os.environ["TERM"] = "xterm-256color"
            os.execv(NATRACE, [NATRACE, "top", "-p", str(pid), "--interval", "0.5"])
        peak = PeakRss(child)
        seen = b""
        deadline = time.monotonic() + 120
        while b"natrace" not in seen.lower() or len(seen) < 2000:
            if time.monotonic() > deadline:
                raise RuntimeError("top drew nothing in 120 s")
            seen += _read(fd, 0.5)
        time.sleep(1.0)  # a refresh or two
        _read(fd, 0)
        t0 = time.monotonic()
        os.write(fd, b"q")
        while True:
            done, _status = os.waitpid(child, os.WNOHANG)
            if done:
                break
            _read(fd, 0.01)
        figures["top: q to exit"].add(time.monotonic() - t0)
        os.close(fd)
        return peak.mib
    finally:
        wp.kill()


def _read(fd: int, timeout: float) -> bytes:
    out = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        timeout = 0
    return out


def floor_round() -> float:
    """The empty-probe floor (bench/floor.py: bcc compiling in process) on the same
    target: its peak RSS."""
    wp = Workload(_workload())
    tracer = None
    try:
        _, pid = wp.ready(60)
        tracer = Proc([sys.executable, "-m", "bench.floor", "-p", str(pid)],
                      env={"PYTHONPATH": str(REPO)})
        peak = PeakRss(tracer.pid)
        tracer.out.wait_for("attached", 300)
        wp.go()
        wp.hot(600)
        tracer.signal(signal.SIGINT)
        tracer.reap(120)
        return peak.mib
    finally:
        if tracer is not None:
            tracer.kill()
        wp.kill()


STEPS = ("floor", "snapshot", "cold", "run", "top")  # what --only picks from


def measure(rounds: int, log: Callable[[str], None],
            only: frozenset[str] = frozenset(STEPS)) -> dict[str, Figure]:
    figures: dict[str, Figure] = {k: Figure() for k in LIMITS}
    for k in COLD:
        figures[f"{k}: natrace and its compiling children, peak RSS MiB"] = Figure()
    for k in ("attach, warm cache", *COLD):
        figures[f"CPU s to {k}"] = Figure()
    for k in ("empty-probe floor", *MODES, *COLD, "run", "top"):
        figures[f"peak RSS MiB: {k}"] = Figure()
    for r in range(1, rounds + 1):
        steps: list[tuple[str, str, Callable[[], float]]] = [
            ("floor", "empty-probe floor", floor_round),
            *[("snapshot", mode, functools.partial(snapshot_round, a, figures,
                                                   "attach, warm cache"))
              for mode, a in MODES.items()],
            *[("cold", cold, functools.partial(_cold, figures, cold)) for cold in COLD],
            ("run", "run", functools.partial(run_round, figures)),
            ("top", "top", functools.partial(top_round, figures)),
        ]
        for name, step in [(name, step) for kind, name, step in steps if kind in only]:
            figures[f"peak RSS MiB: {name}"].add(step())
            log(f"[latency {r}/{rounds}] {name}: done, load {os.getloadavg()[0]:.2f}")
    return figures


COLD = ("attach, cold BPF cache", "attach, first run (every cache cold)")


def _cold(figures: dict[str, Figure], which: str) -> float:
    """A snapshot with a fresh cache directory: empty, or a copy of natrace's own
    without its compiled BPF programs (symbol indexes and unwind rows kept)."""
    with tempfile.TemporaryDirectory(prefix="natrace-cold-") as cache:
        if which == COLD[0] and os.path.isdir(_CACHE):
            shutil.copytree(_CACHE, os.path.join(cache, "natrace"),
                            ignore=shutil.ignore_patterns("bpf"))
        return snapshot_round(["--duration", "24h"], figures, which,
                              env={"XDG_CACHE_HOME": cache})


_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                      "natrace")


def table(title: str, figures: dict[str, Figure]) -> list[str]:
    lines = [f"#### {title}", "", "| target | measured (median) | range | limit | verdict | "
             "1-min load |", "|---|---|---|---|---|---|"]

    def row(label: str, fig: Figure, limit: float | None, unit: str) -> None:
        if not fig.values:
            lines.append(f"| {label} | n/a | | | not measured | |")
            return
        load = f"{min(fig.loads):.1f}–{max(fig.loads):.1f}"
        spread = f"{min(fig.values):.2f}–{max(fig.values):.2f}"
        if limit is None:
            lines.append(f"| {label} | {fig.median:.2f}{unit} | {spread} | — | — | {load} |")
            return
        verdict = "met" if fig.median <= limit else f"missed by {fig.median / limit:.2f}×"
        lines.append(f"| {label} | {fig.median:.2f}{unit} | {spread} | {limit:.2f}{unit} | "
                     f"{verdict} | {load} |")

    for label, limit in LIMITS.items():
        row(label, figures[label], limit, " s")
    for label in [k for k in figures if k.startswith("CPU s to ")]:
        row(label + " (load-independent)", figures[label], None, " s")
    floor = figures["peak RSS MiB: empty-probe floor"]
    row("peak RSS MiB: empty-probe floor", floor, None, "")
    rss_limit = max(floor.values) + RSS_MARGIN_MIB if floor.values else None
    for label, fig in figures.items():
        if label.startswith("peak RSS MiB: ") and fig is not floor:
            # the highest round counts: "at any point"
            peak = Figure([max(fig.values)], [max(fig.loads)]) if fig.values else fig
            row(label.replace("peak RSS MiB", "natrace peak RSS MiB (highest round)"), peak,
                rss_limit, "")
    for k in COLD:
        label = f"{k}: natrace and its compiling children, peak RSS MiB"
        row(label, figures[label], None, "")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-loaded", action="store_true", help="skip the loaded runs")
    parser.add_argument("--no-idle", action="store_true",
                        help="skip the idle runs (each half fits one quiet window)")
    parser.add_argument("--only", default=",".join(STEPS),
                        help=f"comma-separated steps of a round, of {','.join(STEPS)} "
                             "(e.g. --only run --rounds 10); the others are 'not measured'")
    args = parser.parse_args(argv)
    only = frozenset(args.only.split(","))
    if not only <= set(STEPS):
        parser.error(f"--only: unknown step(s) {', '.join(sorted(only - set(STEPS)))}")
    if os.geteuid() != 0:
        print("python -m bench.latency: needs root (BPF tools)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    build()
    out = ["### Latency and natrace's own memory (issue 21)", "",
           f"- command: `python -m bench.latency {' '.join(argv or sys.argv[1:])}`",
           f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; rounds: {args.rounds}; "
           f"machine: {os.cpu_count()} CPUs, Linux {os.uname().release}", ""]
    for title, hogs in [("idle (no busy loops of ours)", 0),
                        (f"loaded ({os.cpu_count()} busy loops)", os.cpu_count() or 1)]:
        if (hogs and args.no_loaded) or (not hogs and args.no_idle):
            continue
        with busy_cpus(hogs):
            out += table(title, measure(args.rounds, log, only)) + [""]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
