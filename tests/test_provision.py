"""The provisioning script and the Vagrantfile: syntax, and idempotence of a second run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROVISION = ROOT / "scripts" / "provision.sh"
VAGRANTFILE = ROOT / "vagrant" / "Vagrantfile"
IN_CI = os.environ.get("CI") == "true"


def test_provision_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_vagrantfile_parses() -> None:
    ruby = shutil.which("ruby")
    if ruby is None:
        if IN_CI:
            pytest.fail("ruby is missing: scripts/provision.sh installs it")
        pytest.skip("ruby is not installed (scripts/provision.sh installs it)")
    proc = subprocess.run([ruby, "-c", str(VAGRANTFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Syntax OK" in proc.stdout


def test_vagrantfile_defines_both_boxes() -> None:
    text = VAGRANTFILE.read_text()
    assert '"debian/bookworm64"' in text
    assert '"ubuntu/jammy64"' in text
    assert "scripts/provision.sh" in text
    assert '"/natrace"' in text


@pytest.mark.skipif(os.geteuid() != 0, reason="scripts/provision.sh runs as root")
def test_provision_is_idempotent() -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running from a virtualenv that scripts/provision.sh made")
    venv = sys.prefix  # the venv running these tests: the second run must not touch it
    env = {**os.environ, "NATRACE_VENV": venv}
    # The first run converges (it may install or reinstall); the second must change nothing.
    first = subprocess.run(
        ["bash", str(PROVISION)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=1800,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(
        ["bash", str(PROVISION)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout == ""
    assert second.stderr.splitlines() == [f"provision: ready: {venv}/bin/natrace"]
