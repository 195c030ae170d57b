"""The tools compared: how each is started on a workload and what it reports.

Three shapes: `bare` (no tool); attaching tools (natrace's modes, memleak-bpfcc, the
empty-probe floor), started on the PID of a workload waiting at its gate and
released once their probes are in place; launching tools (heaptrack, valgrind),
which must start the workload themselves.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import leaks
from bench.procs import BenchError, Proc, Usage, Workload
from bench.workloads import Workload as Spec

NATRACE = str(Path(sys.executable).with_name("natrace"))
REPO = Path(__file__).resolve().parent.parent
HOT_TIMEOUT = 1800.0  # memleak and valgrind are slow: tens of seconds per run
MEMLEAK_INTERVAL = 2  # seconds between memleak's reports (its default is 5)
# natrace is settled once it uses at most 2% of a CPU over half a second
SETTLED_SHARE = 0.02
SETTLE_WINDOW = 0.5
SETTLE_TIMEOUT = 60.0


@dataclass
class Run:
    """One timed run of a workload under one tool."""

    hot_ns: int
    calls: int
    attach_s: float | None = None
    settle_s: float | None = None  # attached tools: from probes in place to the tool idle
    hot_cpu_s: float | None = None  # attached tools: the tool's own CPU during the hot phase
    usage: Usage | None = None
    usage_is_tree: bool = False  # launching tools: the tool and the target together
    leak: leaks.Figure | None = None
    events_lost: int | None = None
    loss: dict[str, int] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)  # the workload's own figures


class Tool:
    name = ""
    reports_leaks = False
    preload_sampler = False  # the workload starts with the in-process sampler preloaded

    def workload_env(self) -> dict[str, str] | None:
        """The workload's environment additions: the sampler preloaded, or nothing."""
        return {"LD_PRELOAD": str(sampler_path())} if self.preload_sampler else None

    def applies(self, spec: Spec) -> bool:
        return True

    def unavailable(self) -> str | None:
        """Why this tool cannot run here ('n/a' in the table), or None."""
        return None

    def run(self, spec: Spec, scratch: Path) -> Run:
        raise NotImplementedError


class Bare(Tool):
    name = "bare"

    def run(self, spec: Spec, scratch: Path) -> Run:
        wp = Workload(spec.argv)
        try:
            wp.ready(60)
            wp.go()
            hot_ns, calls = wp.hot(HOT_TIMEOUT)
            _check_exit(wp.finish(), wp)
            return Run(hot_ns, calls, fields=wp.hot_fields)
        finally:
            wp.kill()


class Attaching(Tool):
    """A tool started on the PID of a workload held at its gate. With `settle`, the
    workload is released only once the tool is idle (its attach-time work done): the
    hot phase then measures the steady cost of being traced, the settling is reported
    apart."""

    env: dict[str, str] = {}
    settle = False

    def command(self, pid: int, scratch: Path) -> list[str]:
        raise NotImplementedError

    def attached(self, tracer: Proc) -> float:
        """When the tool's probes were in place."""
        raise NotImplementedError

    def collect(self, tracer: Proc, spec: Spec, scratch: Path, idle_at: float, run: Run) -> None:
        """Read the tool's figures once the workload is idle; reap it (run.usage)."""
        tracer.signal(signal.SIGINT)
        run.usage = _check_exit(tracer.reap(120), tracer)

    def run(self, spec: Spec, scratch: Path) -> Run:
        wp = Workload(spec.argv, self.workload_env())
        tracer: Proc | None = None
        try:
            _, pid = wp.ready(60)
            t0 = time.monotonic()
            tracer = Proc(self.command(pid, scratch), env=self.env)
            attach_s = self.attached(tracer) - t0
            settle_s = (tracer.wait_idle(SETTLED_SHARE, SETTLE_WINDOW, SETTLE_TIMEOUT)
                        if self.settle else None)
            cpu0 = tracer.cpu_s()
            wp.go()
            hot_ns, calls = wp.hot(HOT_TIMEOUT)
            run = Run(hot_ns, calls, attach_s=attach_s, settle_s=settle_s,
                      hot_cpu_s=tracer.cpu_s() - cpu0, fields=wp.hot_fields)
            self.collect(tracer, spec, scratch, time.monotonic(), run)
            _check_exit(wp.finish(), wp)
            return run
        finally:
            if tracer is not None:
                tracer.kill()
            wp.kill()


class Natrace(Attaching):
    """`natrace snapshot -p PID`, stopped by SIGINT once the hot phase is over. On a
    process with the sampler preloaded (production mode, meant to stay attached for
    hours) the workload is released once natrace has settled."""

    def __init__(self, name: str, args: list[str], reports_leaks: bool = True,
                 needs_option: str | None = None, preload_sampler: bool = False,
                 only: str | None = None) -> None:
        self.name = name
        self.args = args
        self.reports_leaks = reports_leaks
        self.needs_option = needs_option
        self.preload_sampler = preload_sampler  # natrace then attaches to its probes
        self.settle = preload_sampler
        self.only = only  # run on the workloads whose name starts with this only

    def applies(self, spec: Spec) -> bool:
        return self.only is None or spec.name.startswith(self.only)

    def unavailable(self) -> str | None:
        if self.needs_option and self.needs_option not in _snapshot_help():
            return f"natrace snapshot has no {self.needs_option} yet"
        return None

    def command(self, pid: int, scratch: Path) -> list[str]:
        return [NATRACE, "snapshot", "-p", str(pid), "--duration", "24h", "--json",
                "-o", str(scratch / "natrace.json"), *self.args]

    def attached(self, tracer: Proc) -> float:
        t, _ = tracer.err.wait_for("natrace: attached to", 300)
        return t

    def collect(self, tracer: Proc, spec: Spec, scratch: Path, idle_at: float, run: Run) -> None:
        super().collect(tracer, spec, scratch, idle_at, run)
        report_path = scratch / "natrace.json"
        report = json.loads(report_path.read_text())
        run.loss = {k: int(v) for k, v in report.get("loss", {}).items()}
        run.events_lost = run.loss.get("events_lost", 0)
        if spec.leak and self.reports_leaks:
            run.leak = leaks.natrace(report_path, spec.leak.function)


class OtherCheckout(Natrace):
    """`natrace full` as another checkout of natrace builds it (its own venv's natrace,
    named by $NATRACE_OTHER, described by $NATRACE_OTHER_LABEL): the same workload
    paired with this tree's, e.g. main against the commit before a change landed."""

    def __init__(self) -> None:
        label = os.environ.get("NATRACE_OTHER_LABEL", "other checkout")
        super().__init__(f"natrace full ({label})", [], reports_leaks=False)
        self.binary = os.environ.get("NATRACE_OTHER", "")

    def unavailable(self) -> str | None:
        return None if os.path.isfile(self.binary) else "set NATRACE_OTHER to its natrace"

    def command(self, pid: int, scratch: Path) -> list[str]:
        return [self.binary, *super().command(pid, scratch)[1:]]


@functools.cache
def _snapshot_help() -> str:
    return subprocess.run([NATRACE, "snapshot", "--help"], capture_output=True,
                          text=True).stdout


class Memleak(Attaching):
    """bcc's `memleak-bpfcc -p PID INTERVAL`: its first report marks the probes in
    place (INTERVAL after attaching); the leak figure is the first report made
    wholly after the hot phase."""

    name = "memleak-bpfcc"
    reports_leaks = True
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    _header = "stacks with outstanding allocations"

    def command(self, pid: int, scratch: Path) -> list[str]:
        # the stock script, with bcc's attach binding fixed (bench/memleak.py)
        return [sys.executable, "-m", "bench.memleak", "-p", str(pid), str(MEMLEAK_INTERVAL)]

    def attached(self, tracer: Proc) -> float:
        t, _ = tracer.out.wait_for(self._header, 300)
        return t - MEMLEAK_INTERVAL

    def collect(self, tracer: Proc, spec: Spec, scratch: Path, idle_at: float, run: Run) -> None:
        if spec.leak:
            t1, _ = tracer.out.wait_for(self._header, 300, after=idle_at)
            t2, _ = tracer.out.wait_for(self._header, 300, after=t1 + 0.001)
            run.leak = leaks.memleak(tracer.out.text_between(t1, t2), spec.leak.function)
        tracer.signal(signal.SIGINT)  # may land mid-report: its exit code means nothing
        run.usage = tracer.reap(120)


class Floor(Attaching):
    """Empty BPF handlers at natrace's own probe points (bench/floor.py)."""

    env = {"PYTHONPATH": str(REPO)}

    def __init__(self, free_at_zero: bool, syscalls: int = 0) -> None:
        self.free_at_zero = free_at_zero
        self.syscalls = syscalls  # empty programs on each raw_syscalls tracepoint
        self.name = ("floor, free at +0" if free_at_zero else "empty-probe floor") + \
            (" + raw_syscalls" if syscalls == 1 else f" + {syscalls}x raw_syscalls"
             if syscalls else "")

    def command(self, pid: int, scratch: Path) -> list[str]:
        cmd = [sys.executable, "-m", "bench.floor", "-p", str(pid), "--syscalls",
               str(self.syscalls)]
        return [*cmd, "--free-at-zero"] if self.free_at_zero else cmd

    def attached(self, tracer: Proc) -> float:
        t, _ = tracer.out.wait_for("attached", 300)
        return t


class Launching(Tool):
    """A tool that must start the workload itself (LD_PRELOAD, emulation)."""

    def prefix(self, scratch: Path) -> list[str]:
        raise NotImplementedError

    def leak(self, spec: Spec, scratch: Path) -> leaks.Figure:
        raise NotImplementedError

    def run(self, spec: Spec, scratch: Path) -> Run:
        t0 = time.monotonic()
        wp = Workload([*self.prefix(scratch), *spec.argv], self.workload_env())
        try:
            ready_at, _ = wp.ready(300)
            wp.go()
            hot_ns, calls = wp.hot(HOT_TIMEOUT)
            usage = _check_exit(wp.finish(600), wp)
            run = Run(hot_ns, calls, attach_s=ready_at - t0, usage=usage, usage_is_tree=True,
                      fields=wp.hot_fields)
            if spec.leak and self.reports_leaks:
                run.leak = self.leak(spec, scratch)
            return run
        finally:
            wp.kill()


class SamplerDormant(Launching):
    """The in-process sampler preloaded, no tracer attached: what a service pays for
    keeping it loaded."""

    name = "sampler dormant"
    preload_sampler = True

    def prefix(self, scratch: Path) -> list[str]:
        return []

    def unavailable(self) -> str | None:
        return None if _sampler_built() else "the sampler is not built (scripts/provision.sh)"


class Heaptrack(Launching):
    name = "heaptrack"
    reports_leaks = True

    def prefix(self, scratch: Path) -> list[str]:
        return ["heaptrack", "-o", str(scratch / "heaptrack")]

    def leak(self, spec: Spec, scratch: Path) -> leaks.Figure:
        assert spec.leak is not None
        data = next(scratch.glob("heaptrack.*"), None)
        if data is None:
            raise BenchError("heaptrack wrote no data file")
        printed = subprocess.run(["heaptrack_print", "-f", str(data), "-p", "0", "-a", "0",
                                  "-T", "0", "-l", "1"], capture_output=True, text=True,
                                 check=True).stdout
        return leaks.heaptrack(printed, spec.leak.function)


class Valgrind(Launching):
    name = "valgrind memcheck"
    reports_leaks = True

    def applies(self, spec: Spec) -> bool:
        return spec.valgrind

    def prefix(self, scratch: Path) -> list[str]:
        return ["valgrind", "--leak-check=full", f"--log-file={scratch / 'valgrind.log'}"]

    def leak(self, spec: Spec, scratch: Path) -> leaks.Figure:
        assert spec.leak is not None
        return leaks.valgrind((scratch / "valgrind.log").read_text(), spec.leak.function)


def _check_exit(usage: Usage, proc: Proc) -> Usage:
    if usage.exit_code != 0:
        raise BenchError(f"exit code {usage.exit_code}: {proc.err.tail()}")
    return usage


def sampler_path() -> Path:
    return REPO / "sampler" / "build" / "libnatrace_sampler.so"


def _sampler_built() -> bool:
    return sampler_path().is_file()


def all_tools() -> list[Tool]:
    """Every tool in the order each round runs them (each right after its own bare run)."""
    return [
        Natrace("natrace full", []),
        # Same, stacks by frame pointers only: what the CFI walk costs per call.
        Natrace("natrace full (fp stacks)", ["--unwind", "fp"], needs_option="--unwind"),
        # no triage: the memory syscalls from libc's syscall sites, no raw_syscalls program
        Natrace("natrace full --no-triage", ["--no-triage"]),
        OtherCheckout(),
        Natrace("natrace sampled 512K", ["--sample", "512K"]),
        # production mode: natrace leaves the triage tracepoints out by itself
        Natrace("natrace in-process 512K", [], preload_sampler=True),
        Natrace("natrace in-process 512K (fp stacks)", ["--unwind", "fp"],
                preload_sampler=True),
        # every allocation sampled (period 1) on the deep-stack workloads: what natrace's
        # capture at the probe costs per sampled call, CFI walk against frame pointers
        Natrace("natrace in-process every call", ["--sample", "1"], preload_sampler=True,
                only="deep-"),
        Natrace("natrace in-process every call (fp stacks)", ["--sample", "1", "--unwind",
                                                               "fp"],
                preload_sampler=True, only="deep-"),
        SamplerDormant(),
        Natrace("natrace triage", ["--no-allocs"], reports_leaks=False,
                needs_option="--no-allocs"),
        Floor(free_at_zero=False),
        Floor(free_at_zero=True),
        Floor(free_at_zero=False, syscalls=1),  # natrace's sys_enter/sys_exit pair
        Memleak(),
        Heaptrack(),
        Valgrind(),
    ]
