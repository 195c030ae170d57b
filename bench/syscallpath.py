"""What the kernel's traced-syscall path costs a traced malloc, measured within one run:
malloc-heavy's loop in batches (bench/workloads/malloc_batches.c) under a tool, while an
empty program pair on raw_syscalls' sys_enter/sys_exit (or, `--kind tp`, on ten
syscalls:sys_enter_*/sys_exit_* tracepoint pairs: futex and the memory syscalls) is
attached and detached every PERIOD seconds.

    sudo .venv/bin/python -m bench.syscallpath [--tool floor|none|"natrace ARGS"]
                                               [--seconds 40] [--period 2] [--kind raw|tp]

On x86-64 since Linux 6.11 a uretprobe returns through a syscall, so with any program
on a syscall tracepoint every traced malloc's return takes the kernel's traced-syscall
path (and runs the programs). Separate runs of this VM differ by 15-25% (bench/RESULTS.md),
more than that path costs; windows a few seconds apart in one process do not. Each "on"
window is compared with the mean of the "off" windows either side of it; batches that
overlap a switch (attaching 20 syscall tracepoints takes about a second) or start within
0.1 s after one are left out. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import workloads
from bench.procs import wait_attached
from bench.tools import NATRACE

REPO = Path(__file__).resolve().parent.parent
SETTLE_NS = 100_000_000  # batches starting this soon after a switch are left out
TP_SYSCALLS = ("futex", "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
               "futex_wait", "futex_wake", "futex_waitv")


@dataclass(frozen=True)
class Batch:
    start_ns: int
    end_ns: int
    wall: float  # ns per call
    cpu: float


@dataclass(frozen=True)
class Window:
    on: bool
    wall: float  # median ns per call of its batches
    cpu: float
    batches: int


def parse_batch(line: str) -> Batch:
    start, end, wall, cpu = line.split()
    return Batch(int(start), int(end), float(wall), float(cpu))


def windows(batches: Sequence[Batch], periods: Sequence[tuple[int, int, bool]]) -> list[Window]:
    """Each period (monotonic ns from, to, and whether the programs were attached: the
    switching itself lies between periods) with the medians of the batches wholly inside
    it (none starting within SETTLE_NS of its start); periods with no such batch are
    left out."""
    out = []
    for t0, t1, on in periods:
        inside = [b for b in batches if b.start_ns >= t0 + SETTLE_NS and b.end_ns <= t1]
        if inside:
            out.append(Window(on, statistics.median(b.wall for b in inside),
                              statistics.median(b.cpu for b in inside), len(inside)))
    return out


def paired_deltas(wins: Sequence[Window], field: str = "wall") -> list[float]:
    """Each "on" window's figure minus the mean of the "off" windows right before and
    after it (an "on" window without both neighbours off is left out)."""
    out = []
    for before, w, after in zip(wins, wins[1:], wins[2:]):
        if w.on and not before.on and not after.on:
            out.append(getattr(w, field) - (getattr(before, field) + getattr(after, field)) / 2)
    return out


class Switch:
    """The empty programs, loaded once; on() attaches them, off() detaches them."""

    def __init__(self, kind: str) -> None:
        from tracer.probes import bpfprog  # bcc only where it runs (root)

        self.bcc = bpfprog.import_bcc()
        self.kind = kind
        self.attached = False
        self.links: list[int] = []
        if kind == "raw":
            self.bpf = self.bcc.BPF(text="int enter(void *ctx) { return 0; }\n"
                                         "int leave(void *ctx) { return 0; }\n")
            self.fds = [self.bpf.load_func(n, self.bpf.RAW_TRACEPOINT).fd
                        for n in ("enter", "leave")]
        else:
            self.bpf = self.bcc.BPF(text="".join(
                f"TRACEPOINT_PROBE(syscalls, sys_{d}_{s}) {{ return 0; }}\n"
                for s in TP_SYSCALLS for d in ("enter", "exit")))
            self._tracepoints(attach=False)  # bcc attached them while loading

    def _tracepoints(self, attach: bool) -> None:
        for s in TP_SYSCALLS:
            for d in ("enter", "exit"):
                tp = f"syscalls:sys_{d}_{s}"
                if attach:
                    self.bpf.attach_tracepoint(tp=tp, fn_name=f"tracepoint__syscalls__sys_{d}_{s}")
                else:
                    self.bpf.detach_tracepoint(tp=tp)

    def on(self) -> None:
        self.attached = True
        if self.kind != "raw":
            self._tracepoints(attach=True)
            return
        from bench.floor import attach_raw_syscalls  # imports bcc, like bpfprog above

        self.links = attach_raw_syscalls(self.bcc, self.fds)

    def off(self) -> None:
        if not self.attached:
            return
        self.attached = False
        if self.kind != "raw":
            self._tracepoints(attach=False)
            return
        for link in self.links:
            os.close(link)
        self.links = []


def _start_tool(tool: str, pid: int, scratch: str) -> subprocess.Popen[str] | None:
    if tool == "none":
        return None
    if tool == "floor":
        proc = subprocess.Popen([sys.executable, "-m", "bench.floor", "-p", str(pid)],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout
        if "attached" not in proc.stdout.readline():
            raise SystemExit("the floor did not attach")
        return proc
    args = shlex.split(tool)
    if not args or args[0] != "natrace":
        raise SystemExit(f"--tool: floor, none or 'natrace ARGS', not {tool!r}")
    proc = subprocess.Popen([NATRACE, "snapshot", "-p", str(pid), "--duration", "24h", "--json",
                             "-o", f"{scratch}/report.json", *args[1:]],
                            stderr=subprocess.PIPE, text=True)
    wait_attached(proc)
    return proc


def measure(tool: str, seconds: float, period: float,
            kind: str) -> tuple[list[Batch], list[tuple[int, int, bool]]]:
    switch = Switch(kind)
    exe = workloads.build() / "malloc_batches"
    wl = subprocess.Popen([str(exe), "100000", str(seconds + period)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    assert wl.stdin and wl.stdout
    out = wl.stdout
    pid = int(out.readline().split("=")[1])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(out), daemon=True)
    periods: list[tuple[int, int, bool]] = []
    with tempfile.TemporaryDirectory() as scratch:
        proc = _start_tool(tool, pid, scratch)
        try:
            time.sleep(1.0)  # the tool's attach-time work done
            reader.start()
            wl.stdin.write("x")
            wl.stdin.flush()
            on = False
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.monotonic_ns()
                time.sleep(period)
                periods.append((t0, time.monotonic_ns(), on))
                if on:
                    switch.off()
                else:
                    switch.on()
                on = not on
        finally:
            switch.off()
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
            wl.stdin.close()
            wl.wait(60)
            reader.join(10)
    return [parse_batch(line) for line in lines if line.strip()], periods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.syscallpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", default="floor",
                        help="floor (bench/floor.py), none, or 'natrace ARGS' (snapshot -p)")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument("--kind", choices=("raw", "tp"), default="raw")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.syscallpath: needs root (BPF)", file=sys.stderr)
        return 2
    batches, periods = measure(args.tool, args.seconds, args.period, args.kind)
    wins = windows(batches, periods)
    what = ("an empty raw_syscalls pair" if args.kind == "raw"
            else f"{len(TP_SYSCALLS)} empty syscalls:* tracepoint pairs")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; tool {args.tool}; "
          f"{what} switched every {args.period:g} s over {args.seconds:g} s\n")
    print("| | windows | ns per call, wall (median of windows) | CPU |")
    print("|---|---|---|---|")
    for on in (False, True):
        ws = [w for w in wins if w.on == on]
        if ws:
            print(f"| {'on' if on else 'off'} | {len(ws)} | "
                  f"{statistics.median(w.wall for w in ws):,.0f} | "
                  f"{statistics.median(w.cpu for w in ws):,.0f} |")
    wall, cpu = paired_deltas(wins, "wall"), paired_deltas(wins, "cpu")
    if wall:
        print(f"\nadded per call, each on window against its off neighbours: wall median "
              f"{statistics.median(wall):+,.0f} ns (range {min(wall):+,.0f} to {max(wall):+,.0f}"
              f", {len(wall)} windows), CPU median {statistics.median(cpu):+,.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
