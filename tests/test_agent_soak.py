"""An hour of `natrace agent` at 50 times the pace: --interval 0.02 s, so 3,600 turns of
its loop stand for an hour of one-second checks, while watched processes come and go
(each escalates to an allocation window once, then ends: a compile and an attach of
each probe set, the costly part) and one stays throughout.

At every checkpoint (the long-lived process alone watched, in triage) the agent comes
back to exactly the descriptors (perf events included) it held at the first one, no
uprobe of its own is left in tracefs, and its memory stays flat once warm.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from agenting import AgentProcess, free_port, metrics_text, running_agent, wait_for
from allocfixtures import build

# a probe's descriptor: a perf event, or a BPF link (uprobe_multi, raw tracepoints)
PROBE_FDS = ("anon_inode:[perf_event]", "anon_inode:bpf_link")
LOOPS = 3_600  # one simulated hour of one-second turns
CYCLES = 8  # processes that come and go, spread over the hour
WARM = 2  # cycles before memory is measured: caches (ELF symbols, LLVM) fill first
FLAT = 16 << 20  # RSS allowed to move after warm-up (one BPF compile's heap is ~50 MiB)


def _uprobe_events(agent_pid: int) -> list[str]:
    try:
        with open("/sys/kernel/tracing/uprobe_events") as fh:
            return [line for line in fh if line.split()[0].endswith(f"bcc_{agent_pid}")]
    except OSError:
        return []


def _settled(agent: AgentProcess) -> dict[str, int]:
    """The descriptors the agent holds all the time: the least of each kind over a few
    readings (those it opens for an instant are missing from some)."""
    readings = []
    for _ in range(20):
        readings.append(agent.fd_kinds())
        time.sleep(0.05)
    least = {k: min(r.get(k, 0) for r in readings) for k in readings[0]}
    return {k: n for k, n in least.items() if n}


def _loops(port: int) -> int:
    found = re.search(r"^natrace_agent_loops_total (\S+)$", metrics_text(port), re.M)
    assert found, "no natrace_agent_loops_total"
    return int(float(found[1]))


@pytest.mark.bpf
def test_an_hour_at_fifty_times_the_pace(tmp_path: Path) -> None:
    fx = build()
    exe = tmp_path / "leaky-soak"
    shutil.copy(fx.leaky, exe)
    port = free_port()
    checkpoints: list[tuple[dict[str, int], int]] = []  # (fds by kind, RSS)
    ended: list[int] = []
    with running_agent("--match", re.escape(str(exe)), "--rss-limit", "1M",
                       "--window", "0.3s", "--interval", "0.02s", "--push-interval", "0.2s",
                       "--listen", f"127.0.0.1:{port}", "--record-dir", str(tmp_path / "rec"),
                       "--max-overhead", "100%") as agent:
        resident = subprocess.Popen([str(exe), "--wait"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        try:
            agent.expect(rf"watching PID {resident.pid} ")
            agent.expect(rf"PID {resident.pid} .*window over")
            for cycle in range(1, CYCLES + 1):
                proc = subprocess.Popen([str(exe), "--wait"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
                try:
                    agent.expect(rf"watching PID {proc.pid} ")
                    agent.expect(rf"PID {proc.pid} .*window over")
                finally:
                    proc.kill()
                    proc.wait()
                agent.expect(rf"PID {proc.pid} \(.*\) ended: probes removed")
                ended.append(proc.pid)
                turn = cycle * LOOPS // CYCLES
                wait_for(f"loop turn {turn}",
                         lambda turn=turn: True if _loops(port) >= turn else None,
                         patience=600)
                assert _uprobe_events(agent.proc.pid) == []
                if not checkpoints:
                    baseline = _settled(agent)
                # the loop opens files for an instant (/proc reads, ELF files while it
                # symbolizes, a scrape's socket): wait for a moment without them
                kinds = wait_for("the agent's descriptors to be the first checkpoint's",
                                 lambda b=baseline: k if (k := agent.fd_kinds()) == b else None,
                                 patience=60)
                checkpoints.append((kinds, agent.rss()))
            loops = _loops(port)
        finally:
            resident.kill()
            resident.wait()
        agent.expect(rf"PID {resident.pid} \(.*\) ended: probes removed")
        assert sum(agent.fds(kind) for kind in PROBE_FDS) == 0
        assert agent.stop() == 0
    print(f"{CYCLES} processes, {loops} loops; agent RSS MiB: "
          f"{[r >> 20 for _, r in checkpoints]}")
    # the resident process's triage probes
    assert any(checkpoints[0][0].get(kind) for kind in PROBE_FDS)
    assert not [k for k in baseline if k.startswith("/proc/")], baseline
    warm = [rss for _, rss in checkpoints[WARM:]]
    assert max(warm) - warm[0] < FLAT, [r >> 20 for r in warm]
    assert loops >= LOOPS
    for pid in ended:
        assert any(f"PID {pid} (leaky-soak) ended: probes removed" in line
                   for line in agent.lines), pid
