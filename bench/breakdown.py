"""Where the seconds of an attach go: natrace's phases timed one by one.

    sudo .venv/bin/python -m bench.breakdown [--cache warm|cold-bpf|cold] [--unwind auto]

Runs `natrace snapshot -p PID --duration 0.2` on a small workload (or, with `--verb
run`, `natrace run -- true`) in a child process
whose named functions are wrapped with wall-clock timers (nothing in natrace is
changed), and prints each phase's wall seconds (inclusive, summed over its calls) and
the time from the child's exec to `natrace: attached`. `--cache cold-bpf` uses a
fresh cache directory without compiled BPF programs, `cold` an empty one (symbol
indexes and unwind rows rebuilt too). Markdown on stdout.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.procs import Proc, Workload
from bench.workloads import build

#: (label, module, attribute path): each wrapped in the child. Nested phases are
#: indented by their label's leading spaces.
PHASES: list[tuple[str, str, str]] = [
    ("imports of the verb (snapshot)", "tracer.commands", "load"),
    ("session start (everything to probes armed)", "tracer.engine.session", "Session.start"),
    ("  prepare: cold compiles started", "tracer.probes.bpfprog", "prepare"),
    ("  preload: cached programs' maps made, their verifying started", "tracer.probes.bpfprog",
     "preload"),
    ("  alloc probes attach", "tracer.probes.alloc", "AllocProbes.attach"),
    ("    allocator entry points (ELF symbols)", "tracer.probes.allocators",
     "find_entry_points"),
    ("    USDT notes (otel_memory)", "tracer.probes.usdt", "otel_probes"),
    ("    free's probe placement (cache, else capstone)", "tracer.probes.alloc",
     "entry_probe_offset"),
    ("  triage probes attach", "tracer.probes.triage", "TriageProbes.attach"),
    ("  handle probes attach", "tracer.probes.handles", "HandleProbes.attach"),
    ("  kernel BTF offsets", "tracer.probes.kernelbtf", "_struct_members"),
    ("  image: cache lookup or compile, load", "tracer.probes.bpfprog", "compile_program"),
    ("    cache key", "tracer.probes.bpfprog", "_cache_digest"),
    ("    cache read", "tracer.probes.bpfprog", "_read_cached"),
    ("    cold compile (waited for)", "tracer.probes.bpfprog", "_Compile.result"),
    ("    maps created, programs loaded (verifier)", "tracer.probes.bpfimage",
     "LoadedBPF.__init__"),
    ("    verifier of preloaded programs (waited for)", "tracer.probes.bpfimage",
     "LoadedBPF.finish"),
    ("  tracepoints attached (raw)", "tracer.probes.bpfimage",
     "LoadedBPF.attach_tracepoint_functions"),
    ("    bpf_raw_tracepoint_open (libbcc)", "bcc", "lib.bpf_attach_raw_tracepoint"),
    ("    perf_event_open of a tracepoint (libbcc)", "bcc", "lib.bpf_attach_tracepoint"),
    ("  uprobes and uretprobes attached", "tracer.probes.bpfimage",
     "LoadedBPF.attach_uprobe_at"),
    ("    bcc's symbol/path check (ELF read)", "bcc", "BPF._check_path_symbol"),
    ("    uprobe_multi link created", "tracer.probes.bpfimage", "_uprobe_link"),
    ("    perf_event_open of a uprobe (libbcc: another tool's probe there)", "bcc",
     "lib.bpf_attach_uprobe"),
    ("  unwind table update", "tracer.probes.unwinding", "UnwindTables.update"),
    ("    CFI rows of an object (cache or decode)", "tracer.symbols.cfi", "unwind_table"),
    ("    rows clipped to mappings", "tracer.probes.unwinding", "_clip"),
    ("    rows written to BPF", "tracer.probes.unwinding", "UnwindTables._write"),
    ("  /proc/PID/maps read", "tracer.symbols.procmaps", "MapsHistory.__init__"),
    ("first poll", "tracer.engine.session", "Session._poll"),
    ("snapshot (symbolizing, aggregating)", "tracer.engine.session", "Session.snapshot"),
    ("  symbol index of an object", "tracer.symbols.elfsyms", "SymbolIndex.__init__"),
    ("report printed", "tracer.commands.common", "print_report"),
    ("top: the full-screen app until q", "tracer.tui.app", "run_tui"),
    ("  a refresh's sample (snapshot)", "tracer.engine.live", "LiveSampler.sample"),
    ("  the driver stopped (refresh in progress finished)", "tracer.tui.app",
     "TopApp.stop_driver"),
    ("session close (detach)", "tracer.engine.session", "Session.close"),
    ("  helper for the last references started", "subprocess", "Popen.__init__"),
    ("  bcc's cleanup (fds closed)", "bcc", "BPF.cleanup"),
]


def _child(argv: list[str], out_path: str) -> int:
    """Run natrace's main with PHASES timed; timings to `out_path` as JSON."""
    started = time.monotonic()
    totals: dict[str, list[float]] = {label: [0.0, 0] for label, _, _ in PHASES}
    marks: dict[str, float] = {}
    for label, module, attr in PHASES:
        try:
            owner: Any = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name)
        except (ImportError, AttributeError):
            continue  # a phase this version does not have
        setattr(owner, name, _timed(original, totals[label]))
        if isinstance(owner, type(sys)):  # rebind `from module import name` users too
            for mod in list(sys.modules.values()):
                if mod is not owner and getattr(mod, name, None) is original:
                    setattr(mod, name, getattr(owner, name))
    marks["started"] = started
    marks["imports"] = time.monotonic() - started  # natrace's modules, bcc, pyelftools...
    sys.argv = ["natrace", *argv]
    from tracer.cli import main

    @atexit.register  # natrace's main() ends in os._exit, after the atexit handlers
    def _write() -> None:
        marks["returned_at"] = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        with open(out_path, "w") as fh:
            json.dump({"totals": totals, "marks": marks}, fh)

    main()
    return 0


def _timed(fn: Callable[..., Any], cell: list[float]) -> Callable[..., Any]:
    depth = [0]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:
            return fn(*args, **kwargs)  # recursion: counted once
        depth[0] += 1
        t = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            cell[0] += time.monotonic() - t
            cell[1] += 1
    return wrapper


def measure(cache: str, unwind: str, verb: str) -> tuple[dict[str, Any], float, float]:
    """One attach (`snapshot -p` of a workload) or `run -- true`: (phase totals,
    exec to 'attached'/'launched' s, exec to return s)."""
    wp = Workload([str(build() / "malloc_heavy"), "200000", "1000", "1"]) \
        if verb == "snapshot" else None
    with tempfile.TemporaryDirectory(prefix="natrace-breakdown-") as tmp:
        env = {"PYTHONPATH": os.getcwd()}
        own = os.path.join(os.environ.get("XDG_CACHE_HOME") or
                           os.path.expanduser("~/.cache"), "natrace")
        if cache != "warm":
            env["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")
            if cache == "cold-bpf" and os.path.isdir(own):
                shutil.copytree(own, os.path.join(tmp, "cache", "natrace"),
                                ignore=shutil.ignore_patterns("bpf"))
        out = os.path.join(tmp, "timings.json")
        try:
            args = ["run", "--unwind", unwind, "--", "true"]
            if wp is not None:
                _, pid = wp.ready(60)
                args = ["snapshot", "-p", str(pid), "--duration", "0.2", "--unwind", unwind]
            t0 = time.monotonic()
            tracer = Proc([sys.executable, "-m", "bench.breakdown", "--child", out, "--",
                           *args], env=env)
            attached, _ = tracer.err.wait_for("natrace: attached to" if wp else
                                              "natrace: launched", 300)
            usage = tracer.reap(300)
            returned = time.monotonic()
            if usage.exit_code != 0:
                raise RuntimeError(f"natrace exited {usage.exit_code}: {tracer.err.tail()}")
            with open(out) as fh:
                data = json.load(fh)
        finally:
            if wp is not None:
                wp.kill()
    data["marks"]["started"] -= t0
    return data, attached - t0, returned - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[3:], argv[1])
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", choices=("warm", "cold-bpf", "cold"), default="warm")
    parser.add_argument("--unwind", default="auto")
    parser.add_argument("--verb", choices=("snapshot", "run"), default="snapshot",
                        help="snapshot -p of a workload, or run -- true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.breakdown: needs root (BPF)", file=sys.stderr)
        return 2
    build()
    if args.cache == "warm":
        measure("warm", args.unwind, args.verb)  # fills the caches
    data, attached, returned = measure(args.cache, args.unwind, args.verb)
    load = os.getloadavg()[0]
    lines = [f"#### Attach breakdown: natrace {args.verb}, cache {args.cache}, "
             f"--unwind {args.unwind}", "",
             f"- {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, "
             f"1-min load {load:.2f}",
             f"- exec of natrace to 'attached'/'launched': {attached:.2f} s; to its return: "
             f"{returned:.2f} s",
             f"- exec to Python's first line: {data['marks']['started']:.2f} s; imports of "
             f"natrace's modules and of the modules wrapped: {data['marks']['imports']:.2f} s",
             "",
             "| phase | wall s | calls |", "|---|---|---|"]
    for label, (seconds, calls) in data["totals"].items():
        if calls:
            indent = "&nbsp;" * (len(label) - len(label.lstrip()))
            lines.append(f"| {indent}{label.strip()} | {seconds:.3f} | {calls} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
