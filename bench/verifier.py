"""What the kernel's verifier costs at attach: each BPF program natrace loads, its
verified instructions, and the wall and CPU seconds of loading each compile unit
from the BPF cache (the verifier runs in the loading threads).

    sudo .venv/bin/python -m bench.verifier [--unwind auto|fp] [--rounds 3]

Loads (never attaches) alloc.bpf.c, triage.bpf.c and handles.bpf.c with the
parameters a session of `natrace snapshot` on a running process uses, after one
warm-up load that fills the cache. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Any

from bench.bpfinfo import prog_info
from tracer.probes import bpfprog, kernelbtf
from tracer.probes.alloc import AllocOptions, AllocProbes
from tracer.probes.base import ProbeSet
from tracer.probes.handles import HandleOptions, HandleProbes
from tracer.probes.triage import _OPTIONAL, TriageOptions, TriageProbes


def _units(unwind: str) -> list[tuple[str, dict[str, int | str]]]:
    a, t, h = AllocOptions(), TriageOptions(), HandleOptions()
    events = "/sys/kernel/tracing/events"
    units: list[tuple[str, dict[str, int | str], type[ProbeSet]]] = [
        ("alloc.bpf.c", {"SAMPLE_BYTES": 0, **a.table_defines(),
                         "MAX_STACKS": a.stack_map_size, "RINGBUF_PAGES": a.ringbuf_pages,
                         "TARGET_PAGE_SIZE": os.sysconf("SC_PAGE_SIZE")},
         AllocProbes),
        ("triage.bpf.c", {"MAX_KEYS": t.max_keys, "MAX_STACKS": t.stack_map_size,
                          **{flag: 1 for ev, flag in _OPTIONAL
                             if os.path.isdir(os.path.join(events, ev))}},
         TriageProbes),
        ("handles.bpf.c", {"MAX_HANDLES": h.max_handles, "MAX_STACKS": h.stack_map_size},
         HandleProbes),
    ]
    out = []
    for source, defines, probes in units:
        if unwind != "fp":  # as ProbeSet._defines() adds them
            defines = {**defines, "UNWIND_CFI": 1, "UNWIND_DEPTH": probes.unwind_depth,
                       "STACK_CHUNK": probes.stack_chunk,
                       "STACK_CHUNK_TP": probes.stack_chunk_tp,
                       **(kernelbtf.uretprobe_offsets() or {})}
        out.append((source, defines))
    return out


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _load(source: str, defines: dict[str, int | str]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), _cpu()
    bpf = bpfprog.compile_program(source, defines)
    return time.perf_counter() - wall, _cpu() - cpu, bpf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verifier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unwind", default="auto", choices=("auto", "fp"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.verifier: needs root (BPF)", file=sys.stderr)
        return 2
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"--unwind {args.unwind}\n")
    print("| unit | programs | verified insns (sum) | largest program | load wall s "
          "| load CPU s |")
    print("|---|---|---|---|---|---|")
    total_insns = 0
    for source, defines in _units(args.unwind):
        _load(source, defines)[2].close()  # warm-up: compiles into the cache if needed
        walls, cpus, infos = [], [], []
        for _ in range(args.rounds):
            wall, cpu, bpf = _load(source, defines)
            walls.append(wall)
            cpus.append(cpu)
            infos = [(name.decode(), prog_info(fn.fd)) for name, fn in bpf.funcs.items()]
            bpf.close()
        insns = sum(i.verified_insns for _, i in infos)
        total_insns += insns
        name, top = max(infos, key=lambda item: item[1].verified_insns)
        print(f"| {source} | {len(infos)} | {insns:,} | {name} {top.verified_insns:,} "
              f"| {statistics.median(walls):.2f} | {statistics.median(cpus):.2f} |")
    print(f"\nverified instructions in all: {total_insns:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
