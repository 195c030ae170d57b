"""The empty-probe floor: empty BPF handlers at exactly the points natrace probes.

Whatever natrace's handlers cost above this is natrace's own; this much any uprobe
tracer with the same placement pays. `--free-at-zero` puts the entry-only probes
(free) at offset 0 instead, as memleak-bpfcc does, to show what placement saves.
`--syscalls N` adds N empty programs on each of raw_syscalls' sys_enter and sys_exit
(natrace's session has 1 of each): a uretprobe returns through a syscall (x86-64,
Linux 6.11+), so each malloc return runs them too.

usage: python -m bench.floor -p PID [--free-at-zero] [--syscalls N]
Prints "attached N probes" once every probe is in place, then waits for SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any

from tracer.probes import bpfimage, bpfprog
from tracer.probes import target as targets
from tracer.probes.alloc import entry_probe_offset
from tracer.probes.allocators import find_entry_points

PROGRAM = """
int on_entry(void *ctx) { return 0; }
int on_return(void *ctx) { return 0; }
"""


def attach_raw_syscalls(bcc: Any, fds: Sequence[int]) -> list[int]:
    """Links of the programs `fds` on raw_syscalls' sys_enter and sys_exit in turn
    (bcc's attach_raw_tracepoint keeps one program per tracepoint); closing a link
    detaches its program."""
    links = []
    for i, fd in enumerate(fds):
        tp = ("sys_enter", "sys_exit")[i % 2]
        link = bcc.lib.bpf_attach_raw_tracepoint(fd, tp.encode())
        if link < 0:
            raise SystemExit(f"cannot attach an empty program to {tp}")
        links.append(link)
    return links


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
    parser.add_argument("--syscalls", type=int, default=0)
    args = parser.parse_args(argv)
    # one program per attach, as natrace's units have (the kernel refuses a second
    # attach of one program to one tracepoint)
    syscall_programs = [f"on_syscall_{i}" for i in range(2 * args.syscalls)]
    bcc = bpfprog.import_bcc()
    bpf = bcc.BPF(text=PROGRAM + "".join(
        f"int {name}(void *ctx) {{ return 0; }}\n" for name in syscall_programs))
    links = attach_raw_syscalls(bcc, [bpf.load_func(name, bpf.RAW_TRACEPOINT).fd
                                      for name in syscall_programs])
    n = len(links)
    for path, addr, has_return in probe_points(args.pid, args.free_at_zero):
        # perf events counting no semaphore, as natrace's probes: bcc's attach_uprobe
        # would count a stack word, and the kernel refuses a probe on an instruction
        # another probe of which counts a different one (bpfimage.attach_uprobe_at)
        file, offset = bpf._check_path_symbol(path, "", addr, args.pid)
        bpfimage.attach_perf_uprobe(bpf, "on_entry", file, offset, args.pid, False)
        n += 1
        if has_return:
            bpfimage.attach_perf_uprobe(bpf, "on_return", file, offset, args.pid, True)
            n += 1
    print(f"attached {n} probes", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
