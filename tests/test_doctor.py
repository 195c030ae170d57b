"""`natrace doctor`, the privilege helper, and `natrace --version`, run as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tracer
from tracer.errors import PrivilegeError
from tracer.probes import doctor
from tracer.probes.privileges import PRIVILEGE_MESSAGE, require_tracing_privileges

NATRACE = str(Path(sys.executable).parent / "natrace")
REQUIRED = [
    "privileges",
    "kernel",
    "bpf syscall",
    "tracefs",
    "uprobes",
    "tracepoints",
    "kernel headers",
    "bcc import",
    "bcc load",
]


def natrace(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, NATRACE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _status_text(caps: int) -> str:
    return f"Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{caps:016x}\n"


# --- the engine, without privileges ----------------------------------------------------------


@pytest.mark.parametrize(
    ("euid", "caps", "status"),
    [
        (0, (1 << 41) - 1, "ok"),
        (1000, 1 << doctor.CAP_BPF | 1 << doctor.CAP_PERFMON, "ok"),
        (1000, 1 << doctor.CAP_SYS_ADMIN, "ok"),
        (1000, 1 << doctor.CAP_BPF, "fail"),
        (1000, 0, "fail"),
        (0, 0, "fail"),  # root whose capabilities a container dropped
    ],
)
def test_privilege_check(euid: int, caps: int, status: str) -> None:
    result = doctor.check_privileges(_status_text(caps), euid=euid)
    assert result.status == status
    assert (result.fix == doctor.PRIVILEGE_FIX) == (status == "fail")


@pytest.mark.parametrize(
    ("release", "status", "words"),
    [
        ("4.19.0-27-amd64", "fail", ">= 5.0"),
        ("5.4.0-150-generic", "ok", "perf buffers"),
        ("5.15.0-91-generic", "ok", "ring buffers available"),
        ("weird", "warn", "cannot parse"),
    ],
)
def test_kernel_check(release: str, status: str, words: str) -> None:
    result = doctor.check_kernel(release)
    assert result.status == status
    assert words in result.detail


def test_require_tracing_privileges_raises_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = doctor.CheckResult("privileges", "fail", "euid 1000 without CAP_BPF", "x")
    monkeypatch.setattr("tracer.probes.privileges.check_privileges", lambda: failed)
    with pytest.raises(PrivilegeError) as info:
        require_tracing_privileges()
    assert str(info.value) == PRIVILEGE_MESSAGE
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_require_tracing_privileges_passes_when_privileged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "tracer.probes.privileges.check_privileges",
        lambda: doctor.CheckResult("privileges", "ok", "root"),
    )
    require_tracing_privileges()


# --- the CLI -----------------------------------------------------------------------------------


def test_version() -> None:
    proc = natrace("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"natrace, version {tracer.__version__}"


def test_empty_tracefs_dir_fails_with_mount_fix(tmp_path: Path) -> None:
    proc = natrace("doctor", "--tracefs", str(tmp_path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("tracefs "))
    assert lines[row].split()[1] == "fail"
    assert lines[row + 1].strip() == f"fix: mount -t tracefs tracefs {tmp_path}"

    proc = natrace("doctor", "--json", "--tracefs", str(tmp_path))
    assert proc.returncode == 1
    by_name = {r["name"]: r for r in json.loads(proc.stdout)}
    assert by_name["tracefs"]["status"] == "fail"
    assert by_name["tracefs"]["fix"] == f"mount -t tracefs tracefs {tmp_path}"


@pytest.mark.bpf
def test_doctor_passes_here() -> None:
    proc = natrace("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    for name in REQUIRED:  # headers of another kernel version are a warning, not a failure
        assert any(
            line.split("  ")[0] == name and (" ok " in line or
                                             name == "kernel headers" and " warn " in line)
            for line in proc.stdout.splitlines()
        ), name
    assert "natrace can trace on this machine." in proc.stdout


@pytest.mark.bpf
def test_doctor_json_parses() -> None:
    proc = natrace("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)
    assert isinstance(results, list)
    for r in results:
        assert set(r) == {"name", "status", "detail", "fix"}
        assert r["status"] in ("ok", "warn", "info")
    by_name = {r["name"]: r["status"] for r in results}
    assert all(by_name[name] == "ok" or name == "kernel headers" and by_name[name] == "warn"
               for name in REQUIRED), by_name


def _unprivileged_prefix() -> tuple[str, ...]:
    """A command prefix that runs natrace without privileges, preferring user nobody."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop root")
    nobody = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
    # nobody may not be able to reach a checkout under /root: then stay uid 0 with no capabilities.
    reachable = subprocess.run(
        [*nobody, sys.executable, "-c", "import tracer.probes.doctor"],
        capture_output=True, timeout=60,
    )
    if reachable.returncode == 0:
        return nobody
    return (setpriv, "--inh-caps=-all", "--bounding-set=-all")


def test_doctor_unprivileged_fails_with_privilege_fix() -> None:
    proc = natrace("doctor", prefix=_unprivileged_prefix())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("privileges "))
    assert lines[row].split()[1] == "fail"
    assert lines[row + 1].strip() == f"fix: {doctor.PRIVILEGE_FIX}"
    assert "bcc load" in proc.stdout and "not tried" in proc.stdout


def test_headers_of_another_kernel_are_a_warning(tmp_path: Path) -> None:
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    assert doctor.headers_release(str(tmp_path)) == "6.1.0-57-amd64"
    assert doctor.headers_release(str(tmp_path / "none")) is None
    result = doctor.check_headers()
    include = f"/lib/modules/{os.uname().release}/build/include"
    made_for = doctor.headers_release(include)
    if made_for is None or made_for == os.uname().release:
        assert result.status in ("ok", "fail")
    else:  # this project's VMs: Debian's 6.1 headers linked for a newer kernel
        assert result.status == "warn" and not result.failed
        assert f"are the headers of kernel {made_for}, not of the running " \
            f"{os.uname().release}" in result.detail
