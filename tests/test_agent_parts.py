"""`natrace agent`'s parts without BPF: bad input as one line, discovery on real
processes, the budget's knobs, the Pyroscope pusher's retries against a loopback
receiver, and the metrics of a hand-made view through promtool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from agenting import NATRACE, Receiver, wait_for

from tracer.agent.budget import MIN_SAMPLE_BYTES, Budget
from tracer.agent.discovery import RECHECK_SECONDS, Discovery, cmdline, parse_selector
from tracer.agent.metrics import AgentCollector, AgentView, parse_listen
from tracer.agent.pyroscope import MAX_ATTEMPTS, Pusher
from tracer.agent.supervisor import ProcessFigures, SiteRate
from tracer.errors import UsageError
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot


@pytest.mark.parametrize(("args", "message"), [
    ([], "say what to watch: -p PID, --match REGEX or --cgroup PATH"),
    (["--match", "x("], "--match: 'x(' is not a regular expression"),
    (["--cgroup", "/no/such/group"], "--cgroup: /no/such/group is not a cgroup"),
    (["-p", "999999999"], "no process with PID 999999999"),
    (["-p", "1", "--listen", "nowhere"], "--listen: 'nowhere' is not HOST:PORT"),
    (["-p", "1", "--max-overhead", "lots"], "--max-overhead: 'lots' is not a share"),
    (["-p", "1", "--max-overhead", "0"], "--max-overhead: give more than 0"),
    (["-p", "1", "--pyroscope", "pyro:4040"], "--pyroscope: 'pyro:4040' is not an http"),
    (["-p", "1", "--growth", "10M"], "--growth: "),
    (["-p", "1", "--action", "signal:NOPE"], "--action: unknown signal 'NOPE'"),
])
def test_bad_input_is_one_line(args: list[str], message: str) -> None:
    proc = subprocess.run([NATRACE, "agent", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (2, 3), proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not proc.stdout


def test_discovery_picks_up_new_matches_and_drops_ended_ones(tmp_path: Path) -> None:
    marker = f"natrace-discovery-{os.getpid()}-{time.monotonic_ns()}"
    discovery = Discovery(parse_selector([], [marker], []))
    assert discovery.scan() == ([], [])
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        # scanned until seen: a scan racing the child's start may reject it once (the
        # agent looks again after RECHECK_SECONDS); it is then new exactly once
        found: list[int] = []

        def scanned() -> list[int] | None:
            new, ended = discovery.scan()
            assert ended == []
            found.extend(p.pid for p in new)
            return found or None

        assert wait_for("the new process discovered", scanned, RECHECK_SECONDS + 30) == [
            proc.pid], cmdline(proc.pid)
        assert discovery.scan() == ([], [])  # known: not new again
    finally:
        proc.kill()
        proc.wait()
    new, ended = discovery.scan()
    assert new == [] and [p.pid for p in ended] == [proc.pid]


def test_discovery_never_matches_another_natrace(tmp_path: Path) -> None:
    """Another natrace's command line holds the pattern it was given: never matched."""
    marker = f"natrace-self-{time.monotonic_ns()}"
    shutil.copy("/bin/sh", tmp_path / "natrace")
    other = subprocess.Popen([str(tmp_path / "natrace"), "-c", "sleep 60; true", marker])
    try:
        wait_for("its command line", lambda: True if marker in (cmdline(other.pid) or "")
                 else None)
        assert Discovery(parse_selector([], [marker], [])).scan()[0] == []
    finally:
        other.kill()
        other.wait()


def _own_group() -> tuple[str, str]:
    """(mount point of the hierarchy, this process's path in it), the deepest one."""
    mounts = [m.split() for m in Path("/proc/self/mounts").read_text().splitlines()]
    lines = [ln.split(":", 2) for ln in Path("/proc/self/cgroup").read_text().splitlines()]
    _, controllers, group = max(lines, key=lambda f: len(f[2]))
    for _, point, fstype, opts, *_ in mounts:
        if (fstype == "cgroup2" and not controllers) or (
                fstype == "cgroup" and controllers and
                set(controllers.split(",")) <= set(opts.split(","))):
            return point, group
    raise AssertionError("no cgroup mount for this process")


def test_cgroup_selector_matches_this_process() -> None:
    """By the group's directory under its mount (v2, or v1 on hybrid hosts) and by the
    group's own path."""
    mount, group = _own_group()
    for given in (mount + group, group):
        assert parse_selector([], [], [given]).matches(os.getpid()), given
    with pytest.raises(UsageError, match="is not a cgroup"):
        parse_selector([], [], ["/natrace-no-such-group"])


def test_budget_samples_harder_when_over_and_relaxes_when_well_under() -> None:
    budget = Budget(limit=0.5, period=0.0)
    budget.charge(uprobe_hits=10_000_000, tracepoint_hits=0)  # 20 s of probe time
    assert budget.settle() is True
    assert (budget.sample_bytes, budget.window_share) == (MIN_SAMPLE_BYTES, 0.5)
    budget.charge(uprobe_hits=10_000_000, tracepoint_hits=0)
    assert budget.settle() is True
    assert (budget.sample_bytes, budget.window_share) == (4 * MIN_SAMPLE_BYTES, 0.25)
    time.sleep(0.3)  # a quiet period: no hits, next to no CPU
    assert budget.settle() is False
    assert (budget.sample_bytes, budget.window_share) == (2 * MIN_SAMPLE_BYTES, 0.5)
    with budget.setup():  # compiling: left out of the estimate
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
    # /proc's clock ticks are 10 ms: one can be lost at each end
    assert budget.settle() is False and budget.state().setup_cpu_seconds >= 0.28


def _spin(seconds: float) -> None:
    """Burn `seconds` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_setup_cpu_is_the_callers_and_its_threads_not_the_servers() -> None:
    """A thread the set-up starts (bpfimage's loader pool) is set-up CPU; one that was
    already running (the /metrics server) stays steady overhead, even meanwhile."""
    budget = Budget(limit=0.5, period=0.0)
    with budget.setup():
        loader = threading.Thread(target=_spin, args=(0.3,))
        loader.start()
        loader.join()
    # the loader's 0.3 s counts (left out, it would be ~0); /proc's clock ticks are 10 ms
    # and a loaded machine's accounting is coarse, hence the margins
    assert budget.setup_cpu >= 0.2
    budget = Budget(limit=0.5, period=0.0)
    stop, burnt = threading.Event(), [0.0]

    def server() -> None:
        begin = time.thread_time()
        while not stop.is_set():
            burnt[0] = time.thread_time() - begin

    other = threading.Thread(target=server)
    other.start()
    try:
        with budget.setup():
            before = burnt[0]
            _spin(0.1)
            while burnt[0] - before < 0.3:  # the server burns CPU while the set-up waits
                time.sleep(0.01)
    finally:
        stop.set()
        other.join()
    # the set-up's own 0.1 s counts, the server's 0.3 s meanwhile does not (it would be >= 0.4)
    assert 0.05 <= budget.setup_cpu < 0.3


def _snapshot() -> Snapshot:
    frame = Frame(0x401000, "/opt/app/bin/app", 0x1000, "leak", 0x10, module_class="app")
    lib = Frame(0x7f0000001000, "/opt/app/lib/libx.so", 0x1000, "grab", module_class="libx")
    return Snapshot(pid=4242, command="app", taken_at=1.0, duration=2.0, sites=[
        Site("malloc", [frame], bytes=3000, blocks=3, allocs=3, alloc_bytes=3000),
        Site("malloc", [lib], bytes=500, blocks=5, allocs=9, alloc_bytes=900)])


def test_pusher_retries_with_backoff_then_gives_up_and_counts() -> None:
    receiver = Receiver(fail_first=MAX_ATTEMPTS + 1)
    waits: list[float] = []
    pusher = Pusher(receiver.url, sleep=lambda s: bool(waits.append(s)))
    try:
        pusher.submit(_snapshot(), "svc")  # every attempt refused: dropped
        pusher.submit(_snapshot(), "svc")  # refused once, then accepted
        deadline = time.monotonic() + 60
        while len(receiver.posts) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        pusher.close()
        receiver.close()
    counts = pusher.counts()
    assert (counts.pushed, counts.failures, counts.dropped) == (1, MAX_ATTEMPTS + 1, 1)
    assert waits[:MAX_ATTEMPTS] == [0.5 * 2 ** i for i in range(MAX_ATTEMPTS)]
    doc = json.loads(receiver.posts[0][2])
    labels = [{lp["name"]: lp["value"] for lp in s["labels"]} for s in doc["series"]]
    assert [(lb["module"], lb["pid"], lb["service_name"]) for lb in labels] == [
        ("app", "4242", "svc"), ("libx", "4242", "svc")]


def test_metrics_of_a_view_pass_promtool() -> None:
    collector = AgentCollector()
    collector.view = AgentView(processes=(ProcessFigures(
        7, "a \"quoted\" comm\n", "allocations", 30, 1 << 20, 1,
        modules=(("addon:x", 100, 1), ("libpq", 200, 2)),
        sites=(SiteRate("libpq", "PQexec (fe-exec.c:1)", 12.5),),
        handles=(("libpq PGresult", 3),), contended_locks=1,
        lost=(("stack_full", 2),),
        memory=(("natrace_rss_part_bytes", (("label", "free inside the allocator"),
                                             ("part", "free")), 4096.0),
                ("natrace_allocator_free_bytes", (("arena", "main"),), 4096.0),
                ("natrace_memory_verdict", (("verdict", "fragmentation"),), 1.0))),))
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout
    assert 'natrace_unfreed_bytes{comm="a \\"quoted\\" comm\\n",module="libpq",pid="7"} ' \
        '200.0' in text
    assert 'natrace_memory_verdict{comm="a \\"quoted\\" comm\\n",pid="7",' \
        'verdict="fragmentation"} 1.0' in text
    assert parse_listen(":9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
