"""`natrace agent` end to end: a real Prometheus server scrapes it, a loopback receiver
stands in for Pyroscope (decoded with the published push.proto and profile.proto), and
the process it watches is started after it, from tests/fixtures/src/leaky.c, whose
leaks are known exactly.

One scenario (module fixture) runs the agent once; the tests check what it left.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from agenting import (
    SCHEMAS,
    AgentProcess,
    Receiver,
    free_port,
    message_classes,
    metrics_text,
    prometheus,
    running_agent,
    wait_for,
)
from allocfixtures import build
from tracing import release, waiting

# a probe's descriptor: a perf event, or a BPF link (uprobe_multi, raw tracepoints)
PROBE_FDS = ("anon_inode:[perf_event]", "anon_inode:bpf_link")


@dataclass
class Scenario:
    pid: int
    report: dict[str, Any]  # the JSON report the allocation window wrote
    report_path: Path
    recording: Path
    unfreed: dict[str, int]  # module -> natrace_unfreed_bytes, queried from Prometheus
    rss: int  # natrace_process_rss_bytes, queried from Prometheus
    metrics: str  # /metrics while the process was watched
    perf_fds: tuple[int, int, int]  # the agent's perf-event fds: before, watching, after
    posts: list[tuple[str, dict[str, str], bytes]]  # what reached the Pyroscope receiver
    receiver_failed: int
    lines: list[str]  # the agent's stderr
    exit_code: int



def _probe_fds(agent: AgentProcess) -> int:
    return sum(agent.fds(kind) for kind in PROBE_FDS)

def _until_equal(what: str, get: Any, expected: Any) -> Any:
    last: list[Any] = []

    def probe() -> Any:
        last[:] = [get()]
        return last[0] if last[0] == expected else None

    try:
        return wait_for(what, probe)
    except AssertionError:
        assert last and last[0] == expected, what  # shows both sides
        raise


def _counter(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found[1]) if found else -1.0


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    fx = build()
    tmp = tmp_path_factory.mktemp("agent")
    exe = tmp / "leaky-watched"  # a name of its own: other tests' leaky stay unwatched
    shutil.copy(fx.leaky, exe)
    receiver = Receiver(fail_first=1)
    port = free_port()
    try:
        with prometheus(tmp, port) as query, running_agent(
                "--match", re.escape(str(exe)), "--rss-limit", "1M", "--window", "10m",
                "--listen", f"127.0.0.1:{port}", "--record-dir", str(tmp / "records"),
                "--json", "--interval", "0.2s", "--push-interval", "1s",
                "--pyroscope", receiver.url, "--service", "leaky-svc",
                "--max-overhead", "100%") as agent:  # the budget has a test of its own
            before = _probe_fds(agent)
            with waiting(str(exe), "--wait", "--plugin", str(fx.plugin)) as proc:
                agent.expect(rf"watching PID {proc.pid} ")
                agent.expect(rf"PID {proc.pid} .*allocation tracing for")
                release(proc)  # the leaks happen inside the window
                report_path, said = agent.written_on_sigusr1(proc.pid)  # window ends now
                recording = re.search(r"recording (\S+);", said)
                assert recording, said
                report = json.loads(report_path.read_text())
                expected = {m["module"]: m["bytes"] for m in report["modules"]}

                def unfreed() -> dict[str, int]:
                    return {r["metric"]["module"]: int(float(r["value"][1]))
                            for r in query(f'natrace_unfreed_bytes{{pid="{proc.pid}"}}')}

                got = _until_equal("Prometheus to hold the report's unfreed bytes",
                                   unfreed, expected)
                # the process's RSS now, not the report's: detaching the window's uprobes
                # drops the pages they had copied (a few pages less a poll later)
                def rss_now() -> int | None:
                    got = [int(float(r["value"][1])) for r in
                           query(f'natrace_process_rss_bytes{{pid="{proc.pid}"}}')]
                    return got[0] if got == [psutil.Process(proc.pid).memory_info().rss] \
                        else None

                rss = wait_for("Prometheus to hold the process's RSS", rss_now)
                wait_for("the profiles to reach the receiver",
                         lambda: True if receiver.posts else None)
                wait_for("the push counter", lambda: True if _counter(
                    metrics_text(port), "natrace_pyroscope_pushes_total")
                    == len(receiver.posts) else None)
                text = metrics_text(port)
                during = _probe_fds(agent)
                pid = proc.pid
            agent.expect(rf"PID {pid} \(.*\) ended: probes removed")
            after = _probe_fds(agent)
            code = agent.stop()
    finally:
        receiver.close()
    return Scenario(pid, report, report_path, Path(recording[1]), got, rss, text,
                    (before, during, after), list(receiver.posts), receiver.failed,
                    agent.lines, code)


@pytest.mark.bpf
def test_a_process_started_after_the_agent_is_watched_and_escalated(scenario: Scenario) -> None:
    assert scenario.exit_code == 0, scenario.lines
    assert any(f"watching PID {scenario.pid} (leaky-watched): triage" in line
               for line in scenario.lines)
    assert any("RSS" in line and "over the limit 1.0 MiB: allocation tracing" in line
               for line in scenario.lines)
    assert scenario.report["agent"]["reason"].endswith("; ended by SIGUSR1")
    for path in (scenario.report_path, scenario.recording):
        assert path.stat().st_mode & 0o777 == 0o600
    assert scenario.lines[-1] == "natrace agent: stopped; every probe removed"


@pytest.mark.bpf
def test_unfreed_bytes_by_module_through_prometheus_match_the_report(scenario: Scenario) -> None:
    modules = {m["module"]: (m["bytes"], m["blocks"]) for m in scenario.report["modules"]}
    assert scenario.unfreed == {m: b for m, (b, _) in modules.items()}
    # ... and the report holds the fixture's ground truth (leaky.c, plugin.c)
    assert modules["addon:plugin"] == (2_220, 5)
    by_function = {s["function"]: s["module_class"] for s in scenario.report["sites"]}
    assert modules[by_function["lib_leak"]] == (999, 3)
    main = by_function["leak_malloc"]
    assert modules[main][0] == (10_000 + 2_000 + 4_096 + 768 + 1_024 + 84 + 20_000 + 2_112
                                + 12 * 4096 + 6 * 4096)


@pytest.mark.bpf
def test_rss_through_prometheus_is_the_process_rss(scenario: Scenario) -> None:
    assert scenario.rss > 0 and scenario.report["memory"]["timeline"][-1]["rss"] > 0


@pytest.mark.bpf
def test_promtool_check_metrics_is_clean(scenario: Scenario) -> None:
    check = subprocess.run(["promtool", "check", "metrics"], input=scenario.metrics,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        check.stdout + check.stderr
    for family in ("natrace_process_rss_bytes", "natrace_unfreed_bytes",
                   "natrace_site_growth_bytes_per_second", "natrace_live_handles",
                   "natrace_contended_locks", "natrace_events_lost_total",
                   "natrace_agent_cpu_seconds_total", "natrace_agent_resident_memory_bytes",
                   "natrace_escalations_total", "natrace_overhead_ratio",
                   "natrace_pyroscope_push_failures_total",
                   # the allocator's books (glibc, read from outside) and their verdict
                   "natrace_rss_part_bytes", "natrace_allocator_free_bytes",
                   "natrace_memory_verdict"):
        assert f"# TYPE {family} " in scenario.metrics, family


@pytest.mark.bpf
def test_probes_removed_when_the_process_ended(scenario: Scenario) -> None:
    before, during, after = scenario.perf_fds
    assert during > before
    assert after == before


@pytest.mark.bpf
def test_pyroscope_push_decodes_with_the_published_schema(scenario: Scenario,
                                                          tmp_path: Path) -> None:
    from google.protobuf import json_format

    push_request, = message_classes(tmp_path, SCHEMAS / "pyroscope", "push/v1/push.proto",
                                    "push.v1.PushRequest")
    profile, = message_classes(tmp_path, SCHEMAS, "profile.proto",
                               "perftools.profiles.Profile")
    assert scenario.receiver_failed == 1  # the first push was refused: retried, counted
    assert _counter(scenario.metrics, "natrace_pyroscope_push_failures_total") == 1
    path, headers, body = scenario.posts[-1]
    assert path == "/push.v1.PusherService/Push"
    assert headers["Content-Type"] == "application/json"
    request = json_format.Parse(body, push_request())  # strict: unknown fields fail
    expected = {m["module"]: (m["bytes"], m["blocks"]) for m in scenario.report["modules"]}
    seen = {}
    for series in request.series:
        labels = {lp.name: lp.value for lp in series.labels}
        assert labels["service_name"] == "leaky-svc"
        assert labels["host"] == socket.gethostname()
        assert labels["pid"] == str(scenario.pid)
        assert labels["__name__"] == "memory"
        prof = profile()
        prof.ParseFromString(gzip.decompress(series.samples[0].raw_profile))
        st = list(prof.string_table)
        assert [st[t.type] for t in prof.sample_type][:2] == ["inuse_space", "inuse_objects"]
        seen[labels["module"]] = (sum(s.value[0] for s in prof.sample),
                                  sum(s.value[1] for s in prof.sample))
        if labels["module"] == "addon:plugin":
            plugin = [m for m in prof.mapping if st[m.filename].endswith("plugin.node")]
            assert plugin and re.fullmatch(r"[0-9a-f]{40}", st[plugin[0].build_id])
    assert seen == expected


def _samples(text: str, name: str, pid: int) -> dict[str, float]:
    """`name`'s samples for one PID, by their remaining label values joined."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("pid") == str(pid):
                rest = {k: v for k, v in s.labels.items() if k not in ("pid", "comm")}
                out[",".join(rest.values())] = s.value
    return out


@pytest.mark.bpf
def test_live_handles_in_triage_mode_without_limits(tmp_path: Path) -> None:
    """No limit given: triage only, never a window; libpq's live PGresults and PGconns
    (tests/fixtures/src/handles/pgresults.c: 137 and 2) in natrace_live_handles."""
    from handlefixtures import build as build_handles
    from pgserver import private_server

    exe = tmp_path / "pgresults-watched"
    shutil.copy(build_handles().pgresults, exe)
    port = free_port()
    with private_server(port=54343) as pg, running_agent(
            "--match", re.escape(str(exe)), "--listen", f"127.0.0.1:{port}",
            "--record-dir", str(tmp_path / "records"), "--interval", "0.2s",
            "--push-interval", "0.5s") as agent:
        with waiting(str(exe), pg.conninfo, "--wait") as proc:
            agent.expect(rf"watching PID {proc.pid} ")
            release(proc)
            live = _until_equal("137 PGresults and 2 PGconns live in the metrics",
                                lambda: _samples(metrics_text(port), "natrace_live_handles",
                                                 proc.pid),
                                {"libpq PGresult": 137, "libpq PGconn": 2})
            tracing = _samples(metrics_text(port), "natrace_process_allocation_tracing",
                               proc.pid)
        assert agent.stop() == 0
    assert live == {"libpq PGresult": 137, "libpq PGconn": 2}
    assert tracing == {"": 0}
    assert not any("allocation tracing for" in line for line in agent.lines)
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").iterdir())


@pytest.mark.bpf
def test_over_budget_no_window_opens_and_sampling_is_raised(tmp_path: Path) -> None:
    """A budget nothing can keep (a millionth of a CPU): the limit trips, but the agent
    stays in triage, says so, and the next window would be sampled."""
    exe = tmp_path / "leaky-budget"
    shutil.copy(build().leaky, exe)
    port = free_port()
    with running_agent("--match", re.escape(str(exe)), "--rss-limit", "1M",
                       "--max-overhead", "0.0001%", "--listen", f"127.0.0.1:{port}",
                       "--record-dir", str(tmp_path / "records"),
                       "--interval", "0.2s") as agent:
        wait_for("the agent to be over its budget", lambda: True if _counter(
            metrics_text(port), "natrace_over_budget") == 1 else None)
        with waiting(str(exe), "--wait") as proc:
            agent.expect(rf"PID {proc.pid} .*over the limit 1.0 MiB, but natrace is over "
                         r"--max-overhead: triage only")
            text = metrics_text(port)
        assert agent.stop() == 0
    assert _counter(text, "natrace_escalations_total") == 0
    assert _counter(text, "natrace_over_budget") == 1
    assert _counter(text, "natrace_escalation_sample_bytes") >= 4096
    assert _counter(text, "natrace_overhead_budget_ratio") == 1e-6
    assert not any("allocation tracing for" in line for line in agent.lines)


@pytest.mark.bpf
def test_a_process_that_execs_is_watched_again_as_its_new_program(tmp_path: Path) -> None:
    """`sh -c 'exec PROGRAM'`, as services start: the shell is watched, then dropped
    when it execs, and the program it became is watched in the same PID."""
    exe = tmp_path / "leaky-exec"
    shutil.copy(build().leaky, exe)
    with running_agent("--match", re.escape(str(exe)), "--record-dir",
                       str(tmp_path / "records"), "--interval", "0.2s") as agent:
        proc = subprocess.Popen(["/bin/sh", "-c", 'read x; exec "$0" --wait', str(exe)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            agent.expect(rf"watching PID {proc.pid} \(sh\): triage")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("ready")
            agent.expect(rf"PID {proc.pid} \(sh\) exec'd another program: probes removed")
            agent.expect(rf"watching PID {proc.pid} \(leaky-exec\): triage")
        finally:
            proc.kill()
            proc.wait()
        agent.expect(rf"PID {proc.pid} \(leaky-exec\) ended: probes removed")
        assert agent.stop() == 0


@pytest.mark.bpf
def test_site_growth_names_the_steady_leak_first_and_stays_bounded(tmp_path: Path) -> None:
    """tests/fixtures/src/grower.c: leak_steadily() leaks 640 KiB/s, churn_buffer() holds
    4 MiB on and off, hold_cache() 8 MiB flat. With --top 2, at most two site series, the
    steady leak first."""
    exe = tmp_path / "grower-watched"
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-o", str(exe),
                    str(Path(__file__).parent / "fixtures" / "src" / "grower.c")], check=True)
    port = free_port()
    with running_agent("--match", re.escape(str(exe)), "--rss-limit", "1M", "--top", "2",
                       "--window", "10m", "--listen", f"127.0.0.1:{port}", "--record-dir",
                       str(tmp_path / "records"), "--interval", "0.2s",
                       "--push-interval", "1s", "--max-overhead", "100%") as agent:
        proc = subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True)
        try:
            agent.expect(rf"PID {proc.pid} .*allocation tracing for")

            def growing() -> dict[str, float] | None:
                got = _samples(metrics_text(port), "natrace_site_growth_bytes_per_second",
                               proc.pid)
                return got if any(v > 0 for v in got.values()) else None

            rates = wait_for("a growing site in the metrics", growing)
        finally:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0
    assert 1 <= len(rates) <= 2, rates
    fastest = max(rates, key=lambda k: rates[k])
    assert fastest.startswith("grower-watched,leak_steadily"), rates


@pytest.mark.bpf
def test_growth_limit_opens_a_window_that_names_the_grower(tmp_path: Path) -> None:
    """tests/fixtures/src/memory/grower.c grows 1 MiB every 50 ms from grow_heap() once
    released: --growth 8M/2s trips, and the window's report leads with grow_heap."""
    from memfixtures import build as build_memory

    exe = tmp_path / "grower-growth"
    shutil.copy(build_memory().grower, exe)
    port = free_port()
    with running_agent("--match", re.escape(str(exe)), "--growth", "8M/2s",
                       "--window", "10m", "--record-dir", str(tmp_path / "records"),
                       "--listen", f"127.0.0.1:{port}", "--push-interval", "0.5s",
                       "--json", "--interval", "0.2s", "--max-overhead", "100%") as agent:
        proc = subprocess.Popen([str(exe), "400", "50", str(tmp_path / "signalled")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert proc.stdout.readline().startswith("ready")
            agent.expect(rf"watching PID {proc.pid} ")
            proc.stdin.write("x")
            proc.stdin.flush()
            agent.expect(rf"PID {proc.pid} .*: RSS grew .* in 2 s, over the limit "
                         r"8\.0 MiB/2 s: allocation tracing for")
            wait_for("grow_heap's first allocation inside the window", lambda: (
                True if _samples(metrics_text(port), "natrace_unfreed_bytes", proc.pid).get(
                    exe.name, 0) > 0 else None))
            report = agent.written_on_sigusr1(proc.pid)[0]
        finally:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0
    doc = json.loads(report.read_text())
    user = [s for s in doc["sites"] if not s["allocator_internal"]]
    assert user and user[0]["function"] == "grow_heap", [s["label"] for s in user[:3]]


@pytest.mark.bpf
def test_a_process_with_the_in_process_sampler_is_traced_all_the_time(tmp_path: Path) -> None:
    """leaky.c with natrace's sampler preloaded: no window, sampled allocation tracing
    from the moment it is watched (--sample 1: every allocation, so exact figures);
    SIGUSR1 writes its figures without removing the probes."""
    from samplerfixtures import build as build_sampler

    fx = build()
    exe = tmp_path / "leaky-sampled"
    shutil.copy(fx.leaky, exe)
    port = free_port()
    env = {**os.environ, "LD_PRELOAD": str(build_sampler().library)}
    with running_agent("--match", re.escape(str(exe)), "--sample", "1", "--listen",
                       f"127.0.0.1:{port}", "--record-dir", str(tmp_path / "records"),
                       "--json", "--interval", "0.2s", "--push-interval", "0.5s",
                       "--max-overhead", "100%") as agent:
        proc = subprocess.Popen([str(exe), "--wait", "--plugin", str(fx.plugin)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("ready")
            agent.expect(rf"PID {proc.pid} .*: the in-process sampler is loaded: sampled "
                         r"allocation tracing while it runs \(.*, mean 1 B\)")
            release(proc)
            unfreed = wait_for("the plugin's and libleak's bytes in the metrics", lambda: (
                got if {k: got.get(k) for k in ("addon:plugin", "libleak.so")} == {
                    "addon:plugin": 2_220, "libleak.so": 999} else None)
                if (got := _samples(metrics_text(port), "natrace_unfreed_bytes", proc.pid))
                else None)
            text = metrics_text(port)
            report_path = agent.written_on_sigusr1(proc.pid, "sampled figures written")[0]
            still = _probe_fds(agent)
        finally:
            proc.kill()
            proc.wait()
        agent.expect(rf"PID {proc.pid} \(.*\) ended: probes removed")
        assert agent.stop() == 0
    report = json.loads(report_path.read_text())
    assert report["mode"] == "sampled (in-process, mean 1 B)"
    modules = {m["module"]: m["bytes"] for m in report["modules"]}
    assert modules["addon:plugin"] == unfreed["addon:plugin"] == 2_220
    assert modules["libleak.so"] == 999
    assert _samples(text, "natrace_process_in_process_sampler", proc.pid) == {"": 1}
    assert still > 0  # the probes stayed after the report
    assert not any("allocation tracing for" in line for line in agent.lines)
