"""Tests marked @pytest.mark.bpf need root and a working bcc.

Without them such a test is skipped with the reason, except under CI=true, where
it fails: CI must never go green by skipping every test that traces.

After every test, whatever natrace wrote under pytest's temporary directory (reports,
recordings, exports, flamegraphs) and the reports the helpers parsed from its stdout
are swept for frames outside executable code (tests/framecheck.py): a test that
leaves one behind errors at teardown.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import framecheck
import pytest


@functools.cache
def bpf_unusable_reason() -> str | None:
    """Why BPF tracing cannot work here (the first failing doctor check), or None."""
    from tracer.probes import doctor

    _, tracefs = doctor.find_tracefs()
    for result in (
        doctor.check_privileges(),
        doctor.check_bpf_syscall(),
        tracefs,
        doctor.check_headers(),
        doctor.check_bcc_import(),
    ):
        if result.failed:
            return f"BPF unusable: {result.name}: {result.detail}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("bpf") is None:
        return
    reason = bpf_unusable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: bpf tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def _frame_sweep(tmp_path_factory: pytest.TempPathFactory) -> framecheck.Sweep:
    return framecheck.Sweep(tmp_path_factory.getbasetemp())


@pytest.fixture(autouse=True)
def _no_frame_in_data(_frame_sweep: framecheck.Sweep) -> Iterator[None]:
    yield
    problems = _frame_sweep.check()
    if problems:
        pytest.fail("frames outside executable code:\n  " + "\n  ".join(problems[:20]),
                    pytrace=False)


@pytest.fixture(scope="session")
def long_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recording whose JSON report is ~2 MB: 3,000 call sites, far past a pipe's 64 KiB."""
    from test_recording import MAIN

    from tracer.model.frames import Frame
    from tracer.model.sites import Site
    from tracer.model.snapshot import Snapshot
    from tracer.recording import RecordingWriter

    sites = [Site("malloc", [Frame(0x401000 + 16 * i, "/opt/app/bin/app", 0x1000 + 16 * i,
                                   f"function_number_{i}", 4, "app.c", i, "app"), MAIN],
                  1000 + i, 1, 1, 1000 + i) for i in range(3000)]
    snap = Snapshot(pid=42, command="app", taken_at=1_700_000_000, duration=1.0, sites=sites)
    path = tmp_path_factory.mktemp("long") / "long.natrace"
    with RecordingWriter(str(path), {"pid": 42, "command": "app"}) as writer:
        writer.add(snap)
    return path
