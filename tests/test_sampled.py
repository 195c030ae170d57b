"""Production mode: the process samples itself (sampler/) and natrace attaches to its
otel_memory USDT probes. Real probes on real processes: launched with the sampler
preloaded, or preloaded dormant and attached later; glibc or jemalloc under it; C, C++,
threads, fork+exec, node with an addon. A period of 1 samples every allocation with its
own size, so those figures are exact; the estimator is checked at realistic periods."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from framecheck import seen

from bench.workloads import build as build_bench
from tests import tracing
from tests.samplerfixtures import JEMALLOC, Built, build, semaphores
from tracer.probes.sampler import SamplerConfig

pytestmark = pytest.mark.bpf

FAMILY_LIVE = (14_838, 9)  # allocate_all in family.c: bytes, blocks kept
THREADS_LIVE = (3000 + 3001, 2)  # thread_body, with 2 threads
CPP_LIVE = (40_618, 8)  # allocate_all in family.cpp


@pytest.fixture(scope="module")
def built() -> Built:
    return build()


def _site(report: dict[str, Any], function: str) -> dict[str, Any]:
    found = [s for s in report["sites"] if s["function"] == function and s["kind"] == "malloc"]
    assert len(found) == 1, [(s["function"], s["bytes"]) for s in report["sites"]]
    return found[0]


def _exact(site: dict[str, Any], live: tuple[int, int]) -> None:
    assert (site["bytes"], site["blocks"], site["samples"]) == (*live, live[1])
    assert site["bytes_interval"] == [live[0], live[0]]


def _run(out: Path, *argv: str | Path, stdin: str = "", env: dict[str, str] | None = None
         ) -> dict[str, Any]:
    """`natrace run --json -o OUT ARGV`, the command's stdin given; the report."""
    proc = subprocess.run([tracing.NATRACE, "run", "--json", "-o", str(out),
                           *map(str, argv)], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def test_launched_every_entry_point_threads_and_a_forked_exec(built: Built,
                                                             tmp_path: Path) -> None:
    """`run --sampled` preloads the sampler; the forked child that execs (and reloads
    the sampler: natrace attaches its probes to it at the exec) is followed and reported
    on its own, exact. The samplers' own count of the probes they fired, summed over
    the processes, is what natrace saw."""
    report = _run(tmp_path / "r.json", "--sampled", "--sample", "1", "--",
                  built.family, "2", built.family, "-1", stdin="xx")
    assert report["mode"] == "sampled (in-process, mean 1 B)" and report["in_process"]
    parent, child = report["processes"]
    _exact(_site(parent, "allocate_all"), FAMILY_LIVE)
    _exact(_site(parent, "thread_body"), THREADS_LIVE)
    assert child["parent"] == parent["pid"] and child["command"].endswith("family -1")
    _exact(_site(child, "allocate_all"), FAMILY_LIVE)
    assert "thread_body" not in {s["function"] for s in child["sites"]}
    assert report["loss"]["sampler_dropped"] == 0 and report["loss"]["stale"] == 0
    assert report["calls"]["sampler_fired"] == report["calls"]["allocs"] == 32


def test_an_exec_from_a_thread_is_followed_exactly(built: Built, tmp_path: Path) -> None:
    """An exec from a thread other than the main one ends the task the otel_memory
    links were made for: natrace makes them again for the new one (the new image's
    semaphores counted in by them), so the program exec'd is exact."""
    from allocfixtures import build as build_alloc

    report = _run(tmp_path / "r.json", "--sampled", "--sample", "1", "--",
                  build_alloc().execer, "--thread", built.family, "-1")
    [proc] = report["processes"]
    assert proc["command"] == f"{built.family} -1"
    _exact(_site(proc, "allocate_all"), FAMILY_LIVE)
    assert report["calls"]["sampler_fired"] == report["calls"]["allocs"] == 14
    assert not any("exec'd from a thread" in n for n in report["notes"]), report["notes"]


def test_the_text_report_leaves_temporary_allocations_unmeasured(built: Built,
                                                                  tmp_path: Path) -> None:
    """Sampled in the process, a thread's next allocation is seldom seen, so whether a
    block was freed before it (temporary) cannot be told: the report says so instead of
    a 0 that reads as a count."""
    out = tmp_path / "r.txt"
    proc = subprocess.run([tracing.NATRACE, "run", "-o", str(out), "--sampled", "--sample",
                           "1", "--", str(built.family), "-1"], input="xx",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text().splitlines()
    line = next(ln for ln in text if ln.startswith("Allocated while traced:"))
    got = re.match(r"Allocated while traced: ~([\d,]+) bytes in ~([\d,]+) allocations at "
                   r"\d+ call sites, temporary ones not measured \(sampled\)", line)
    assert got, line
    # family.c's allocations, every one sampled (period 1): exact but for the "~"; the
    # rest are the start-up's mappings (ld.so's, counted exactly)
    head = next(i for i, ln in enumerate(text) if ln.split()[:2] == ["ALLOCATIONS", "%"])
    rows = [ln.replace("~", "").replace(",", "").split() for ln in text[head + 1:]]
    rows = [r for r in rows[:next(i for i, r in enumerate(rows) if not r)] if len(r) >= 7]
    size, calls = (int(g.replace(",", "")) for g in got.groups())
    assert ({r[5] for r in rows} - {"family", "ld.so"}, sum(int(r[0]) for r in rows),
            sum(int(r[2]) for r in rows)) == (set(), calls, size), text
    family = [r for r in rows if r[5] == "family"]
    assert (sum(int(r[0]) for r in family), sum(int(r[2]) for r in family)) == (14, 23_951)


def test_a_forking_server_sampled_per_process(tmp_path: Path) -> None:
    """Pre-fork workers (tests/fixtures/src/forker.c) in production mode: each worker
    shares its parent's sampler, natrace attaches the probes to it at its birth; each
    process exact on its own, the samplers' counts (each from the worker's fork on)
    summed to what natrace saw."""
    from allocfixtures import build_trees
    from test_processes import check_adds_up, own_sites

    report = _run(tmp_path / "r.json", "--sampled", "--sample", "1", "--",
                  build_trees().forker)
    parent, *workers = report["processes"]
    assert own_sites(parent)["parent_leak"] == (4_000, 4, 4)
    assert sorted(own_sites(w)["worker_leak"] for w in workers) == [(1_536, 3, 10),
                                                                   (3_072, 6, 13)]
    assert all(w["parent"] == parent["pid"] and w["exited"] for w in workers)
    check_adds_up(report)
    assert report["calls"]["sampler_fired"] == report["calls"]["allocs"] == 27


def _attached(argv: list[str | Path], library: Path, preload: list[Path] | None,
              *args: str) -> dict[str, Any]:
    """A dormant preloaded process (preload None: one that loads the sampler itself),
    natrace attached (semaphores counted in), its work, natrace stopped: semaphores back
    to 0 and no breakpoint left."""
    env = {**os.environ}
    if preload is not None:
        env["LD_PRELOAD"] = " ".join(map(str, [library, *preload]))
    proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        assert semaphores(proc.pid, library) == (0, 0)  # dormant
        tracer = tracing.attach(proc.pid, "--duration", "10m", "--json", *args)
        counted = semaphores(proc.pid, library)
        tracing.release(proc)
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        # dormant again, no breakpoint left: once the kernel's teardown, which may lag
        # natrace's exit on a loaded machine, is through
        deadline = time.monotonic() + 120
        while (left := (semaphores(proc.pid, library), tracing.patched_code_bytes(proc.pid))
               ) != ((0, 0), 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == ((0, 0), 0)
        report: dict[str, Any] = seen("natrace snapshot", json.loads(out))
        report["counted"] = counted
        config = SamplerConfig.find(proc.pid, str(library))
        report["interposes"] = config.interposes() if config else None
        return report
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("children", [True, False], ids=["children", "not followed"])
def test_a_forked_child_is_armed_only_while_traced(built: Built, children: bool) -> None:
    """A child forked while natrace traces its parent inherits the parent's armed
    sampler (the kernel's breakpoints and semaphore counts are per address space, and
    fork copies them). Followed (--children), it is stopped at birth and gets its own
    probes, so its own 4444 B block is exact; not followed, it is named as not traced.
    Either way detaching returns both to dormant, and a process natrace does not trace
    (another one preloading the sampler) is never armed: the probes filter by process."""
    env = {**os.environ, "LD_PRELOAD": str(built.library)}
    other, proc = (subprocess.Popen([str(built.family), "0", *extra], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
                   for extra in ([], ["--stay"]))
    child = 0
    try:
        assert other.stdout is not None and proc.stdout is not None and proc.stdin is not None
        assert other.stdout.readline().startswith("ready")
        assert proc.stdout.readline().startswith("ready")
        tracer = tracing.attach(proc.pid, "--duration", "10m", "--json", "--sample", "1",
                                *(["--children"] if children else []))
        proc.stdin.write("x")
        proc.stdin.flush()
        said = {proc.stdout.readline().strip() for _ in range(2)}  # the two, either order
        child = int(next(ln for ln in said if ln.startswith("child pid=")).split("=")[1])
        assert "done" in said, said
        armed = [semaphores(pid, built.library) for pid in (proc.pid, child, other.pid)]
        assert armed == [(1, 1), (1, 1), (0, 0)]
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        deadline = time.monotonic() + 120  # the kernel's teardown may lag natrace's exit
        while (left := [(semaphores(pid, built.library), tracing.patched_code_bytes(pid))
                        for pid in (proc.pid, child)]) != [((0, 0), 0)] * 2 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == [((0, 0), 0)] * 2
        report = seen("natrace snapshot", json.loads(out))
    finally:
        for p in (other, proc):
            with contextlib.suppress(OSError):
                p.communicate("xx", timeout=10)
            p.kill()
            p.wait()
    parent, *followed = report["processes"]
    _exact(_site(parent, "allocate_all"), FAMILY_LIVE)
    if children:
        assert [c["pid"] for c in followed] == [child]
        site = _site(followed[0], "main")
        assert (site["bytes"], site["blocks"], site["samples"]) == (4444, 1, 1)
        assert report["calls"]["sampler_fired"] == report["calls"]["allocs"] == 14 + 1
    else:
        assert followed == []
        assert any("not traced" in n and f"{child} (" in n for n in report["notes"]), \
            report["notes"]
        assert report["calls"]["sampler_fired"] == report["calls"]["allocs"] == 14


@pytest.mark.parametrize("under", ["glibc", "jemalloc"])
def test_attached_to_a_dormant_process(built: Built, under: str) -> None:
    """Production mode leaves the triage tracepoints out and says so; --triage (asked
    here under jemalloc) puts them back."""
    allocator = [JEMALLOC] if under == "jemalloc" else []
    asked = ["--triage"] if under == "jemalloc" else []
    report = _attached([built.family, "2"], built.library, allocator, "--sample", "1", *asked)
    assert report["counted"] == (1, 1) and report["interposes"] is True
    assert report["mode"] == "sampled (in-process, mean 1 B)"
    _exact(_site(report, "allocate_all"), FAMILY_LIVE)
    _exact(_site(report, "thread_body"), THREADS_LIVE)
    production = [n for n in report["notes"] if n.startswith("production mode")]
    if asked:
        assert "locks" in report and "syscalls" in report
        assert production == ["production mode (the process samples itself): the built-in "
                              "handle pairs left out (--handles adds them)"]
    else:
        assert "locks" not in report and "syscalls" not in report
        assert production == ["production mode (the process samples itself): triage "
                              "tracepoints and the built-in handle pairs left out "
                              "(--triage, --handles add them)"]


@pytest.mark.parametrize("under", ["glibc", "jemalloc"])
def test_cpp_operators(built: Built, under: str) -> None:
    """libstdc++'s new samples through malloc; jemalloc's own new through the sampler's."""
    allocator = [JEMALLOC] if under == "jemalloc" else []
    report = _attached([built.family_cpp], built.library, allocator, "--sample", "1")
    _exact(_site(report, "allocate_all()"), CPP_LIVE)


def test_launched_cpp_program_is_sampled_from_its_first_allocation(built: Built,
                                                                    tmp_path: Path) -> None:
    """libstdc++ is initialised before the preloaded sampler and allocates (its emergency
    pool) with the probes already on: the sampler reads the period natrace put in its
    environment then, not at its own constructor, so at period 1 every allocation fires,
    as exact tracing counts them (8 kept, 13 freed, stdout's buffer)."""
    sampled = _run(tmp_path / "s.json", "--sampled", "--sample", "1", "--", built.family_cpp,
                   stdin="xx")
    exact = _run(tmp_path / "e.json", "--", built.family_cpp, stdin="xx")
    assert sampled["calls"]["allocs"] == sampled["calls"]["sampler_fired"] == 22
    assert exact["calls"]["allocs"] == 22
    _exact(_site(sampled, "allocate_all()"), CPP_LIVE)


def test_an_attached_process_that_exits_between_polls(built: Built) -> None:
    """natrace reads the sampler's counters on every poll and while a launched process
    or a child is held in _Exit; an attached process is never held, and one that works
    and exits between two polls leaves its count unread: then the report has no
    sampler_fired rather than a stale one (it said 0 here)."""
    env = {**os.environ, "LD_PRELOAD": str(built.library)}
    proc = subprocess.Popen([str(built.family), "2"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().startswith("ready")
    tracer = tracing.attach(proc.pid, "--duration", "10m", "--json", "--sample", "1")
    tracing.release(proc)
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    out, err = tracer.communicate(timeout=120)  # the target's exit ends the snapshot
    assert tracer.returncode == 0, err
    report = json.loads(out)
    _exact(_site(report, "allocate_all"), FAMILY_LIVE)
    assert report["calls"]["allocs"] == 17 and "sampler_fired" not in report["calls"]
    assert "sampler_dropped" not in report["loss"]


def test_a_dlopened_sampler_falls_back_to_uprobes(built: Built) -> None:
    """Loaded by dlopen, after glibc, the sampler is called by nothing: its constructor
    says so (natrace_sampler.interposing 0), and natrace, rather than attach probes that
    never fire, hooks the allocator (exact figures) and says why in one note."""
    report = _attached([built.dlopened, built.library], built.library, None)
    assert report["interposes"] is False and report["counted"] == (0, 0)
    assert report["mode"] == "full" and not report["in_process"]
    site = _site(report, "keep_blocks")
    assert (site["bytes"], site["blocks"], site["allocs"]) == (28_000, 40, 65)
    assert [n for n in report["notes"] if "dlopen" in n] == [
        "the in-process sampler was loaded with dlopen, after the allocator, and samples "
        "nothing: exact uprobes instead (preload it, LD_PRELOAD=$(natrace sampler-path), "
        "for production mode)"]


def test_exact_forces_uprobes(built: Built) -> None:
    report = _attached([built.family, "0"], built.library, [], "--exact")
    assert report["counted"] == (0, 0) and report["mode"] == "full"
    site = _site(report, "allocate_all")
    assert (site["bytes"], site["blocks"]) == FAMILY_LIVE


def test_node_with_an_addon(built: Built, tmp_path: Path) -> None:
    script = f"require({str(built.leaker)!r}).leak(100, 1234); console.log('ok')"
    report = _run(tmp_path / "r.json", "--sampled", "--sample", "1", "--", "node", "-e", script)
    site = _site(report, "leak_blocks")
    assert site["module_class"] == "addon:leaker"
    _exact(site, (100 * 1234 + 100 * 8, 101))  # the blocks, and the array holding them


def test_node_attached_while_dormant(built: Built) -> None:
    """/usr/bin/node is not PIE and takes malloc's address: dlsym(RTLD_DEFAULT) names its
    PLT, yet the preloaded sampler interposes (it comes before glibc) and is used."""
    script = (f"const a = require({str(built.leaker)!r}); console.log('ready');"
              "process.stdin.once('data', () => { a.leak(50, 1000); console.log('done');"
              " process.stdin.once('data', () => process.exit(0)); });")
    report = _attached(["node", "-e", script], built.library, [], "--sample", "1")
    assert report["interposes"] is True and report["counted"] == (1, 1)
    assert report["mode"] == "sampled (in-process, mean 1 B)"
    _exact(_site(report, "leak_blocks"), (50 * 1000 + 50 * 8, 51))


@pytest.mark.parametrize("threads", [1, 2])
def test_estimates_within_ten_percent(threads: int, tmp_path: Path) -> None:
    """bench's malloc-heavy loop: 10,000 x 1,000 B leaked from leak_here() amid 400,000
    malloc/free pairs of 16-4096 B. At a 4 KiB period ~2,400 samples hit the leak (sd
    ~2%, so +-10% is 5 sd); the seed makes the sample points reproducible."""
    binary = build_bench() / "malloc_heavy"
    report = _run(tmp_path / "r.json", "--sampled", "--sample", "4K", "--", binary, "400000",
                  "10000", str(threads), stdin="xx", env={"NATRACE_SAMPLER_SEED": "7"})
    assert report["mode"] == "sampled (in-process, mean 4,096 B)"
    site = _site(report, "leak_here")
    assert site["samples"] >= 100
    assert abs(site["bytes"] - 10_000_000) <= 1_000_000, site["bytes"]
    assert abs(site["blocks"] - 10_000) <= 1_000, site["blocks"]
    low, high = site["bytes_interval"]
    assert low < 10_000_000 < high


def test_sampled_stacks_are_true_without_frame_pointers(built: Built, tmp_path: Path) -> None:
    """The stacks of sampled calls are natrace's own capture at the probe (the CFI walk):
    through tests/fixtures/src/nofp's chain, built -O2 without frame pointers, every
    frame from the sampler's caller up to main, the same exact figures as the uprobes
    give (period 1); before it only the sampler's own frames (return addresses: the
    probe's pc is left out), charged past."""
    from allocfixtures import build_nofp
    from test_unwinding import TRUTH

    report = _run(tmp_path / "r.json", "--sampled", "--sample", "1", "--",
                  build_nofp().chain)
    assert report["mode"] == "sampled (in-process, mean 1 B)"
    for function, (figures, frames) in TRUTH.items():
        site = _site(report, function)
        assert (site["bytes"], site["blocks"]) == figures
        stack, charged = site["stack"], site["charge_index"]
        assert [f["symbol"] for f in stack[charged:charged + len(frames)]] == frames, stack
        # gcc 12: traced_malloc tail-calls sampled, whose .cold part calls sample(),
        # which tail-calls fire_alloc
        ours = [f["symbol"] for f in stack[:charged]]
        assert ours == ["sampled.cold"], ours
        assert {f["module_class"] for f in stack[:charged]} == {"natrace-sampler"}
    assert not any(report["loss"].values()), report["loss"]


def test_allocation_from_signal_handlers(built: Built, tmp_path: Path) -> None:
    """signals.c: 200 blocks of 100 B kept by a SIGUSR1 handler (raised: exact, charged
    to in_handler called from the handler), while SIGPROF handlers that allocate and
    free interrupt 300,000 malloc/free pairs, the sampler's slow path included (there
    the reentrant call only counts down): nothing lost, nothing left, no hang."""
    out = tmp_path / "r.json"
    proc = subprocess.run([tracing.NATRACE, "run", "--sampled", "--sample", "1", "--json",
                           "-o", str(out), "--", str(built.signals)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    said = re.search(r"alarms (\d+) kept 200", proc.stderr)
    assert said and int(said.group(1)) > 0, proc.stderr
    alarms = int(said.group(1))
    report = json.loads(out.read_text())
    site = _site(report, "in_handler")
    _exact(site, (20_000, 200))
    charged = site["charge_index"]
    assert [f["symbol"] for f in site["stack"][charged:charged + 2]] == ["in_handler",
                                                                          "on_usr1"]
    main = _site(report, "main")
    assert (main["bytes"], main["allocs"]) == (0, 300_000)
    prof = [s for s in report["sites"] if s["function"] == "on_prof"]
    assert all(s["bytes"] == 0 for s in prof) and sum(s["allocs"] for s in prof) <= alarms
    assert not any(report["loss"].values()), report["loss"]
    assert report["calls"]["sampler_fired"] == report["calls"]["allocs"]
