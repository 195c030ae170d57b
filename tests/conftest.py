"""Tests marked @pytest.mark.bpf need root and a working bcc.

Without them such a test is skipped with the reason, except under CI=true, where
it fails: CI must never go green by skipping every test that traces.
"""

from __future__ import annotations

import functools
import os

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
