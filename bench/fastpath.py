"""`python -m bench.fastpath [--rounds N] [--size B]`: the in-process sampler's cost per
call on its own (bench/workloads/alloc_fastpath.c: ns per malloc and per free of small
blocks), bare against the sampler dormant and traced (natrace attached: production
mode, 512 KiB period), in paired rounds; Markdown on stdout. The OpenTelemetry design
measured 10.4 ns per call dormant on x86 for its sampler."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.procs import BenchError
from bench.tools import Bare, Natrace, SamplerDormant, Tool
from bench.workloads import Workload, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastpath", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20000,
                        help="rounds of 1,024 mallocs then 1,024 frees per run")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    spec = Workload("fastpath", (str(build() / "alloc_fastpath"), str(args.batches),
                                 str(args.size)), "malloc or free")
    tools: list[Tool] = [Bare(), SamplerDormant(),
                         Natrace("sampler traced", [], reports_leaks=False,
                                 preload_sampler=True)]
    figures: dict[str, list[tuple[float, float]]] = {t.name: [] for t in tools}
    for r in range(args.rounds):
        for tool in tools:
            with tempfile.TemporaryDirectory(prefix="natrace-fastpath-") as scratch:
                try:
                    run = tool.run(spec, Path(scratch))
                except BenchError as err:
                    print(f"[{r + 1}] {tool.name}: FAILED {err}", file=sys.stderr)
                    continue
            got = float(run.fields["malloc_ns"]), float(run.fields["free_ns"])
            figures[tool.name].append(got)
            print(f"[{r + 1}/{args.rounds}] {tool.name}: malloc {got[0]:.2f} ns, "
                  f"free {got[1]:.2f} ns", file=sys.stderr, flush=True)
    bare = figures["bare"]
    out = [f"- command: `python -m bench.fastpath --rounds {args.rounds} --batches "
           f"{args.batches} --size {args.size}`; loadavg {os.getloadavg()[0]:.2f}", "",
           "| mode | runs | ns per malloc (median) | ns per free (median) | "
           "overhead per malloc+free pair vs bare (median of paired runs) |",
           "|---|---|---|---|---|"]
    for name, runs in figures.items():
        if not runs:
            out.append(f"| {name} | 0 | n/a | n/a | n/a |")
            continue
        pairs = [(m + f) - (bm + bf) for (m, f), (bm, bf) in zip(runs, bare)]
        out.append(f"| {name} | {len(runs)} | {statistics.median(r[0] for r in runs):.2f} | "
                   f"{statistics.median(r[1] for r in runs):.2f} | "
                   f"{statistics.median(pairs):+.2f} ns |")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
