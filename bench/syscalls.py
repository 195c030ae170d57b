"""What natrace attached to one process costs every other process on the machine: CPU
ns per getppid() of an unrelated process, bare and with natrace attached elsewhere.

    sudo .venv/bin/python -m bench.syscalls [--rounds 3] [--calls 2000000] [--natrace PATH]

natrace's kernel events come from raw tracepoints, and a program on raw_syscalls'
sys_enter/sys_exit runs for every syscall of every process (ARCHITECTURE.md). Each
round starts `natrace snapshot -p <a sleeping process> --duration 24h` (allocations and
triage: every syscall program natrace has), runs the loop (bench/workloads/
syscall_loop.c, thread CPU time) `--runs` times, stops natrace, and runs it as many times
bare; each figure is the minimum over runs (the machine's noise only adds). The raw
tracepoint links natrace held are listed (from /proc/PID/fdinfo). Markdown on stdout,
with the load average and kernel.bpf_stats_enabled (1 adds the kernel's time accounting
to every program run).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from bench import workloads
from bench.procs import wait_attached
from bench.tools import NATRACE

_RAW_TRACEPOINT_LINK = "1"  # enum bpf_link_type BPF_LINK_TYPE_RAW_TRACEPOINT


def _loop(calls: int, runs: int) -> float:
    """The least CPU ns per getppid() over `runs` runs of the loop."""
    exe = str(workloads.build() / "syscall_loop")
    return min(float(subprocess.run([exe, str(calls)], capture_output=True, text=True,
                                    check=True).stdout.split("=")[1]) for _ in range(runs))


def raw_tracepoints(pid: int) -> collections.Counter[str]:
    """The raw tracepoint links process `pid` holds, by tracepoint name."""
    found: collections.Counter[str] = collections.Counter()
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in entry.read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if fields.get("link_type", "").strip() in ("raw_tracepoint", _RAW_TRACEPOINT_LINK):
            found[fields.get("tp_name", "?").strip()] += 1
    return found


def _attached(natrace: str, calls: int, runs: int) -> tuple[float, collections.Counter[str]]:
    sleeper = subprocess.Popen(["sleep", "600"])
    nat = subprocess.Popen([natrace, "snapshot", "-p", str(sleeper.pid), "--duration", "24h",
                            "-o", os.devnull], stderr=subprocess.PIPE, text=True)
    try:
        wait_attached(nat)
        links = raw_tracepoints(nat.pid)
        return _loop(calls, runs), links
    finally:
        nat.send_signal(signal.SIGINT)
        nat.wait(60)
        sleeper.kill()
        sleeper.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--natrace", default=NATRACE, help="the natrace to measure")
    parser.add_argument("--rounds", type=int, default=3, help="attached/bare pairs")
    parser.add_argument("--runs", type=int, default=5, help="loop runs per point")
    parser.add_argument("--calls", type=int, default=2_000_000, help="getppid()s per run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.syscalls: needs root (BPF)", file=sys.stderr)
        return 2
    bare, attached, loads = [], [], []
    links: collections.Counter[str] = collections.Counter()
    for _ in range(args.rounds):
        ns, links = _attached(args.natrace, args.calls, args.runs)
        attached.append(ns)
        bare.append(_loop(args.calls, args.runs))
        loads.append(os.getloadavg()[0])
    stats = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    print(f"load average {min(loads):.2f}–{max(loads):.2f}; kernel.bpf_stats_enabled "
          f"{stats}; {args.natrace}; min of {args.runs} × {args.calls:,} getppid() per "
          f"point, {args.rounds} rounds\n")
    held = ", ".join(f"{name} {n}" for name, n in sorted(links.items())) or "none"
    print(f"raw tracepoint links natrace held: {held}\n")
    print("| | ns per getppid (median of rounds) | rounds |")
    print("|---|---|---|")
    print(f"| bare | {statistics.median(bare):.0f} | {' '.join(f'{x:.0f}' for x in bare)} |")
    print(f"| natrace attached elsewhere | {statistics.median(attached):.0f} | "
          f"{' '.join(f'{x:.0f}' for x in attached)} |")
    extra = [a - b for a, b in zip(attached, bare)]
    print(f"| added per syscall | **{statistics.median(extra):.0f}** | "
          f"{' '.join(f'{x:.0f}' for x in extra)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
