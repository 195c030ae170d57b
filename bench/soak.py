"""A long soak: natrace attached to malloc_heavy at full speed for many minutes.

Checks that natrace's own memory stays bounded (issue target: <= 200 MiB RSS over
10 minutes at the highest event rate the benchmarks reach) and flat in steady state
(issue 21: its VmRSS is read every --every seconds), and that its figures stay exact:
the leak it reports must equal the workload's own count. Not a CI test (it takes
minutes): run it by hand and note the result in bench/RESULTS.md. $NATRACE_OTHER (another
checkout's natrace) soaks that one instead, e.g. main before a change.

    python -m bench.soak [--minutes 10] [--pairs N] [--every 30] [--leak-every 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.workloads import LEAK_BLOCK, LEAK_FUNCTION, build

NATRACE = os.environ.get("NATRACE_OTHER") or str(Path(sys.executable).with_name("natrace"))
# natrace's full tracing handles roughly 250k malloc/free pairs a second on the
# project's 2-vCPU VM: size the workload to last about the requested minutes.
PAIRS_PER_SECOND = 250_000


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":"))


def _sample_rss(pid: int, every: float, out: list[tuple[float, float]],
                done: threading.Event) -> None:
    """natrace's VmRSS (MiB) every `every` seconds from the go, until `done`."""
    began = time.monotonic()
    while True:
        with contextlib.suppress(OSError, StopIteration):
            out.append((round(time.monotonic() - began), _status_kib(pid, "VmRSS") / 1024))
        if done.wait(every):
            return


def soak(minutes: float, pairs: int | None, every: float = 30.0,
         leak_every: int = 1000) -> dict[str, Any]:
    pairs = pairs or int(minutes * 60 * PAIRS_PER_SECOND)
    leaks = pairs // leak_every
    workload = subprocess.Popen([str(build() / "malloc_heavy"), str(pairs), str(leaks)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert workload.stdin is not None and workload.stdout is not None
    assert workload.stdout.readline().startswith("ready")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        tracer = subprocess.Popen([NATRACE, "snapshot", "-p", str(workload.pid), "--duration",
                                   "24h", "--json", "-o", str(report)],
                                  stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        assert "attached to PID" in tracer.stderr.readline()
        proc = psutil.Process(tracer.pid)
        series: list[tuple[float, float]] = []
        done = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(tracer.pid, every, series, done))
        began = time.monotonic()
        workload.stdin.write("go\n")
        workload.stdin.flush()
        sampler.start()
        for line in workload.stdout:  # hot_ns=..., then "idle" once the leak is final
            if line.startswith("idle"):
                break
        seconds = time.monotonic() - began
        done.set()
        sampler.join()
        rss = proc.memory_info().rss
        peak = _status_kib(tracer.pid, "VmHWM") * 1024  # natrace's peak RSS
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=300)
        got = next(s for s in json.loads(report.read_text())["sites"]
                   if s["function"] == LEAK_FUNCTION)
        workload.stdin.close()
        workload.wait(timeout=60)
    return {"seconds": round(seconds, 1), "pairs": pairs, "pairs_per_s": round(pairs / seconds),
            "natrace_rss_mib_end": round(rss / 2**20, 1),
            "natrace_rss_mib_peak": round(peak / 2**20, 1),
            "leak_blocks_true": leaks, "leak_blocks_reported": got["blocks"],
            "leak_bytes_true": leaks * LEAK_BLOCK, "leak_bytes_reported": got["bytes"],
            "natrace": NATRACE, "rss_mib_every": every,
            "natrace_rss_mib": [f"{t:.0f}s {m:.1f}" for t, m in series]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=None,
                        help="malloc/free pairs (default: sized from --minutes)")
    parser.add_argument("--every", type=float, default=30.0,
                        help="seconds between readings of natrace's VmRSS")
    parser.add_argument("--leak-every", type=int, default=1000,
                        help="pairs per leaked block (fewer: the target's heap grows and "
                             "fragments faster, as at full speed on a quiet machine)")
    args = parser.parse_args()
    result = soak(args.minutes, args.pairs, args.every, args.leak_every)
    print(json.dumps(result, indent=2))
    exact = (result["leak_blocks_reported"] == result["leak_blocks_true"]
             and result["leak_bytes_reported"] == result["leak_bytes_true"])
    return 0 if exact and result["natrace_rss_mib_peak"] <= 200 else 1


if __name__ == "__main__":
    sys.exit(main())
