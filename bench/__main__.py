"""`python -m bench [--quick] [--workloads a,b] [--tools a,b] [--rounds N] [--scale K]
[--no-throughput]`

Builds the workloads, runs every tool in paired rounds, prints Markdown (the machine,
the load before and after, one table per workload, the targets, the throughput
ladder) on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys

from bench import report, runner, throughput
from bench.tools import all_tools
from bench.workloads import build, workloads


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small workloads, 1 round, short throughput ladder")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated subset of: malloc, malloc-2t, futex, mmap, node, "
                             "sqlite, deep-fp-4|32|100, deep-nofp-4|32|100")
    parser.add_argument("--tools", default=None,
                        help="comma-separated subset of the tools, by the names the tables "
                             "show (e.g. 'natrace full,empty-probe floor')")
    parser.add_argument("--rounds", type=int, default=None,
                        help="paired rounds per tool (default 3, 1 with --quick)")
    parser.add_argument("--scale", type=int, default=1,
                        help="multiply each workload's hot phase by K (a longer hot phase "
                             "measures a steady cost; default 1)")
    parser.add_argument("--no-throughput", action="store_true",
                        help="skip the event-pipeline throughput ladder")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench: needs root (BPF tools)", file=sys.stderr)
        return 2

    available = workloads(args.quick, max(args.scale, 1))
    names = args.workloads.split(",") if args.workloads else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(available)}")
    specs = [available[n] for n in names]
    rounds = args.rounds or (1 if args.quick else 3)
    tools = all_tools()
    if args.tools:
        wanted = args.tools.split(",")
        known = [t.name for t in tools]
        if any(w not in known for w in wanted):
            parser.error(f"unknown tool(s) in {args.tools!r}; known: {', '.join(known)}")
        tools = [t for t in tools if t.name in wanted]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    build()
    started = datetime.datetime.now().astimezone()
    load_before = _loadavg()
    results = runner.measure(specs, tools, rounds, log)
    steps = [] if args.no_throughput else throughput.measure(args.quick, log)
    load_after = _loadavg()

    out = [
        "## natrace benchmark",
        "",
        f"- command: `{shlex.join(['python', '-m', 'bench', *(argv or sys.argv[1:])])}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M %Z')}; rounds: {rounds}",
        f"- machine: {os.cpu_count()} CPUs ({_cpu_model()}), Linux {os.uname().release}",
        f"- loadavg (1/5/15 min) before: {load_before}; after: {load_after}",
        "- slowdown: median over rounds of (tool's hot phase / the bare run right before it),"
        " and the paired ratios' geometric mean with its 95% interval (t over the log"
        " ratios); ns/call: (tool - bare) / calls, median; attach: tool start to probes in"
        " place (launching tools: start to the workload's gate); settle: then until natrace"
        " uses ≤ 2% of a CPU over 0.5 s (production-mode tools only: the hot phase measures"
        " the steady cost); tool CPU while hot: the tool's own CPU during the hot phase, as"
        " a share of one CPU; † = tool and target together",
        "",
    ]
    for spec in specs:
        out += report.workload_table(spec, [runner.Bare(), *tools], results)
        out.append("")
    out += ["### Targets (issues 5 and 20)", ""] + report.targets(results, specs) + [""]
    out += ["### Targets (issue 21; waits and memory by mode: python -m bench.latency)", ""]
    out += report.targets_21(results, specs) + [""]
    if steps:
        out += ["### Event-pipeline throughput (natrace full, mmap/munmap streamed)", ""]
        out += report.throughput_table(steps) + [""]
    sys.stdout.write("\n".join(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
