"""Memory syscalls (mmap, munmap, mremap, mprotect, madvise, brk): an strace -c summary."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.callsite import CallSite


@dataclass
class SyscallSite:
    """The calls of one syscall from one call site (mmap, munmap and brk only)."""

    site: CallSite
    calls: int = 0
    errors: int = 0
    ns: int = 0
    bytes: int = 0


@dataclass
class MemSyscall:
    """One syscall over the traced time. `bytes` counts successful calls' lengths
    (mremap: new length; brk: how far the break moved)."""

    name: str
    calls: int = 0
    ns: int = 0
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # errno name -> failed calls
    sites: list[SyscallSite] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


@dataclass
class SyscallSummary:
    duration: float  # seconds traced, for rates
    syscalls: list[MemSyscall] = field(default_factory=list)

    def rate(self, n: int) -> float:
        return n / self.duration if self.duration > 0 else 0.0

    def get(self, name: str) -> MemSyscall | None:
        return next((s for s in self.syscalls if s.name == name), None)
