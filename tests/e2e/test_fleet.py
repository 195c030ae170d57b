"""The motivating case under `natrace agent`, as a fleet would run it: the Node.js app
started after the agent through `sh -c 'exec node …'`, picked up by --match, escalated
when its RSS passes the limit, and its native memory by module read back through a real
Prometheus server: what libpq and the vault addon hold matches the window's report and
the scenario's ground truth (tests/e2e/scenario.py); the addon's mutex is counted as a
contended lock from the triage probes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import scenario
from agenting import free_port, metrics_text, prometheus, running_agent, wait_for
from conftest import Env

pytestmark = pytest.mark.bpf

SECONDS = 6


def test_the_agent_watches_the_motivating_case(e2e: Env, tmp_path: Path) -> None:
    app_js = str(scenario.APP / "app.js")
    command = " ".join(shlex.quote(a) for a in
                       scenario.app_command(e2e.conninfo, SECONDS, wait=True))
    port = free_port()
    with prometheus(tmp_path, port) as query, running_agent(
            "--match", rf"^node {re.escape(app_js)}", "--rss-limit", "32M",
            "--window", "10m", "--listen", f"127.0.0.1:{port}", "--record-dir",
            str(tmp_path / "records"), "--json", "--interval", "0.2s",
            "--push-interval", "1s", "--max-overhead", "100%") as agent:
        app = subprocess.Popen(["/bin/sh", "-c", f"exec {command}"],
                               env={**os.environ, "VAULT_ADDON": str(e2e.addon)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdin is not None and app.stdout is not None
        try:
            assert app.stdout.readline().startswith("ready")
            agent.expect(rf"PID {app.pid} \(node\): RSS .* allocation tracing for")
            app.stdin.write("go\n")
            app.stdin.flush()
            done = app.stdout.readline()
            assert done.startswith("done "), done
            contended = wait_for("the vault mutex counted as contended", lambda: (
                1 if re.search(rf'^natrace_contended_locks{{comm="node",pid="{app.pid}"}} '
                               r"[1-9]", metrics_text(port), re.M) else None))
            report = json.loads(agent.written_on_sigusr1(app.pid)[0].read_text())
            expected = {m["module"]: m["bytes"] for m in report["modules"]}

            def unfreed() -> dict[str, int] | None:
                got = {r["metric"]["module"]: int(float(r["value"][1]))
                       for r in query(f'natrace_unfreed_bytes{{pid="{app.pid}"}}')}
                return got if got == expected else None

            wait_for("Prometheus to hold the report's unfreed bytes", unfreed)
        finally:
            app.kill()
            app.wait()
        assert agent.stop() == 0
    truth = scenario.truth_from(done, e2e.libpq_per_call)
    assert contended == 1
    assert abs(expected["libpq"] - truth.libpq_bytes) <= 0.05 * truth.libpq_bytes
    assert abs(expected["addon:vault"] - truth.addon_bytes) <= 0.05 * truth.addon_bytes
