"""Where full tracing's per-call cost goes: the kernel's own run time of each BPF
program (kernel.bpf_stats_enabled) over malloc-heavy's hot phase, with natrace
attached as `snapshot -p` does.

    sudo .venv/bin/python -m bench.bpftime [--natrace PATH] [--pairs N]

A tail-called program's time counts in the program that entered it (alloc_return
holds the stack walk's). Uprobe programs run only for the traced process's calls;
tracepoint programs (raw_syscalls) run for every process's syscalls on the machine,
so their runs are other processes' too: the per-call total counts the uprobes'.
Markdown on stdout; kernel.bpf_stats_enabled is put back.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import workloads
from bench.bpfinfo import ProgInfo, loaded_programs
from bench.procs import wait_attached
from bench.tools import NATRACE

_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def held_programs(pid: int) -> dict[int, ProgInfo]:
    """The programs process `pid` holds (others' tracers may run on the machine)."""
    held: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # closed meanwhile
        held.update(int(line.split()[1]) for line in text.splitlines()
                    if line.startswith("prog_id:"))
    return {p.id: p for p in loaded_programs() if p.id in held}


_KPROBE = 2  # BPF_PROG_TYPE_KPROBE: uprobes


def _measure(natrace: str, pairs: int) -> tuple[int, int, list[tuple[ProgInfo, int, int]]]:
    """(hot ns, calls, [(program, runs, run ns)]) over one hot phase."""
    build = workloads.build()
    wl = subprocess.Popen([str(build / "malloc_heavy"), str(pairs), str(pairs // 200), "1"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert wl.stdin and wl.stdout
    pid = int(wl.stdout.readline().split("=")[1])
    with tempfile.TemporaryDirectory() as tmp:
        nat = subprocess.Popen([natrace, "snapshot", "-p", str(pid), "--duration", "24h",
                                "--json", "-o", f"{tmp}/report.json"],
                               stderr=subprocess.PIPE, text=True)
        try:
            wait_attached(nat)
            before = held_programs(nat.pid)
            wl.stdin.write("x")
            wl.stdin.flush()
            fields = dict(kv.split("=") for kv in wl.stdout.readline().split())
            after = held_programs(nat.pid)
        finally:
            nat.send_signal(signal.SIGINT)
            nat.wait(60)
            wl.stdin.close()
            wl.wait(30)
    return int(fields["hot_ns"]), int(fields["calls"]), run_deltas(before, after)


def run_deltas(before: dict[int, ProgInfo],
               after: dict[int, ProgInfo]) -> list[tuple[ProgInfo, int, int]]:
    """(program, runs, run ns) of each program that ran between two readings."""
    rows = []
    for prog_id, p in after.items():
        b = before.get(prog_id)
        runs = p.run_cnt - (b.run_cnt if b else 0)
        if runs:
            rows.append((p, runs, p.run_time_ns - (b.run_time_ns if b else 0)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bpftime", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--natrace", default=NATRACE, help="the natrace to measure")
    parser.add_argument("--pairs", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.bpftime: needs root (BPF)", file=sys.stderr)
        return 2
    was = _STATS.read_text().strip()
    _STATS.write_text("1")
    try:
        hot_ns, calls, rows = _measure(args.natrace, args.pairs)
    finally:
        _STATS.write_text(was)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.natrace}; "
          f"hot phase {hot_ns / calls:,.0f} ns per call over {calls:,} calls\n")
    print("| program | runs | ns per run | ns per call |")
    print("|---|---|---|---|")
    for prog, runs, ns in sorted(rows, key=lambda r: -r[2]):
        if ns * 1000 >= hot_ns:  # the others: the rare fork, exit and fault programs
            print(f"| {prog.name} | {runs:,} | {ns / runs:,.0f} | {ns / calls:,.0f} |")
    uprobes = sum(ns for prog, _runs, ns in rows if prog.type == _KPROBE)
    print(f"| all uprobe programs | | | {uprobes / calls:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
