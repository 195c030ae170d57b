"""What bpf/target.bpf.h keeps about the target in every compile unit: whether the
probes record (armed) and how many times the target exec'd."""

from __future__ import annotations

import ctypes
from typing import Any

from tracer.target import Target


def arm(bpf: Any, target: Target) -> None:
    """Call once every probe is attached. A running target records from then on (a
    thread inside malloc meanwhile entered unseen, so its return is ignored, instead
    of leaving a half-seen call that would hide the thread's later calls as nested);
    a launched one records from its gate's exec."""
    if not target.launched:
        bpf["armed"][ctypes.c_int(0)] = ctypes.c_uint32(1)


def execs(bpf: Any) -> int:
    """exec()s of the target since the probes were attached."""
    if bpf is None:
        return 0
    return int(bpf["execs"][ctypes.c_int(0)].value)
