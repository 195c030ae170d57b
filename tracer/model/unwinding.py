"""How a session's stacks were walked: which objects by their CFI, which by frame
pointers, and why walks ended before the thread's first frame."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Why a walk ended (tracer/probes/unwinding.py names bpf/natrace.h's NATRACE_END_*),
#: with the sentence a report prints. "outermost" is the normal end.
END_DESCRIPTIONS = {
    "depth": "the frame limit was reached (127 for allocations, 32 for triage events)",
    "no_mapping": "an address outside the unwind table's mappings (code mapped since, "
                  "walked by frame pointers) where frame pointers ended",
    "no_unwind_info": "code without unwind information",
    "unsupported_rule": "a DWARF expression rule (PLT stubs, signal frames, hand-written "
                        "assembly)",
    "unreadable_stack": "stack memory that could not be read",
    "bad_frame": "a frame address below the stack pointer",
    "dropped": "no walk: the event was lost (natrace was detaching, or another thread's "
               "capture took the CPU's slot while this one was preempted)",
}


@dataclass
class Unwinding:
    mode: str  # auto | cfi | fp (--unwind)
    objects: dict[str, str] = field(default_factory=dict)  # module path -> "cfi" | "fp"
    ended: dict[str, int] = field(default_factory=dict)  # reason -> walks (CFI walk only)
    cached: int = 0  # of those, answered by the stack-id cache (the same stack, not walked)
    cache_stale: int = 0  # captures the cache matched by registers but a word had changed

    @property
    def walks(self) -> int:
        return sum(self.ended.values())

    def early(self) -> dict[str, int]:
        """Walks that ended before the thread's first frame, by reason."""
        return {k: v for k, v in self.ended.items() if v and k != "outermost"}
