"""User page faults per call site: who touches new memory is who grows RSS."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.callsite import CallSite


@dataclass
class FaultSite:
    site: CallSite
    faults: int


@dataclass
class FaultSummary:
    """`available` is False where the kernel has no exceptions:page_fault_user."""

    available: bool
    total: int = 0
    sites: list[FaultSite] = field(default_factory=list)
