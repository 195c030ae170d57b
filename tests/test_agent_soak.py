"""An hour of `natrace agent` at 50 times the pace: --interval 0.02 s, so 3,600 turns of
its loop stand for an hour of one-second checks, while watched processes come and go
(each escalates to an allocation window once, then ends: a compile and an attach of
each probe set, the costly part) and one stays throughout.

At every checkpoint (the long-lived process alone watched, in triage) the agent holds
exactly the same file descriptors and perf events as at the first one (leaving out the
/proc files its loop reads for an instant; none of an ended process's), no uprobe of
its own is left in tracefs, and its memory stays flat once warm.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from agenting import free_port, metrics_text, running_agent, wait_for
from allocfixtures import build

PERF = "anon_inode:[perf_event]"
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
                if checkpoints:  # a scrape's socket closes on the server's thread
                    wait_for("the agent's sockets to settle", lambda: True if agent.fd_kinds()
                             .get("socket") == checkpoints[0][0].get("socket") else None)
                kinds = agent.fd_kinds()
                assert not [k for k in kinds if any(k.startswith(f"/proc/{pid}/")
                                                    for pid in ended)], kinds
                # the loop's own /proc reads come and go: everything else must stay put
                checkpoints.append(({k: n for k, n in kinds.items()
                                     if not k.startswith("/proc/")}, agent.rss()))
            loops = _loops(port)
        finally:
            resident.kill()
            resident.wait()
        agent.expect(rf"PID {resident.pid} \(.*\) ended: probes removed")
        assert agent.fds(PERF) == 0
        assert agent.stop() == 0
    print(f"{CYCLES} processes, {loops} loops; agent RSS MiB: "
          f"{[r >> 20 for _, r in checkpoints]}")
    assert all(fds == checkpoints[0][0] for fds, _ in checkpoints), checkpoints
    assert checkpoints[0][0].get(PERF)  # the resident process's triage probes
    warm = [rss for _, rss in checkpoints[WARM:]]
    assert max(warm) - warm[0] < FLAT, [r >> 20 for r in warm]
    assert loops >= LOOPS
    for pid in ended:
        assert any(f"PID {pid} (leaky-soak) ended: probes removed" in line
                   for line in agent.lines), pid
