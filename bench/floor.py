"""The empty-probe floor: empty BPF handlers at exactly the points natrace probes.

Whatever natrace's handlers cost above this is natrace's own; this much any uprobe
tracer with the same placement pays. `--free-at-zero` puts the entry-only probes
(free) at offset 0 instead, as memleak-bpfcc does, to show what placement saves.

usage: python -m bench.floor -p PID [--free-at-zero]
Prints "attached N probes" once every probe is in place, then waits for SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys

from tracer.probes import bpfprog
from tracer.probes import target as targets
from tracer.probes.alloc import entry_probe_offset
from tracer.probes.allocators import find_entry_points

PROGRAM = """
int on_entry(void *ctx) { return 0; }
int on_return(void *ctx) { return 0; }
"""


def probe_points(pid: int, free_at_zero: bool) -> list[tuple[str, int, bool]]:
    """(path, address, has_return) for every entry point natrace would probe in PID."""
    target = targets.attach(pid)
    points = []
    for ep in find_entry_points(target.mapped_files(), target.executable()):
        offset = 0 if free_at_zero else entry_probe_offset(ep)
        points.append((ep.path, ep.vaddr + offset, ep.has_return))
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("-p", "--pid", type=int, required=True)
    parser.add_argument("--free-at-zero", action="store_true")
    args = parser.parse_args(argv)
    bpf = bpfprog.import_bcc().BPF(text=PROGRAM)
    n = 0
    for path, addr, has_return in probe_points(args.pid, args.free_at_zero):
        bpf.attach_uprobe(name=path, addr=addr, fn_name="on_entry", pid=args.pid)
        n += 1
        if has_return:
            bpf.attach_uretprobe(name=path, addr=addr, fn_name="on_return", pid=args.pid)
            n += 1
    print(f"attached {n} probes", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
