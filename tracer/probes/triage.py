"""Triage probes: futex waits, memory syscalls and page faults, tracepoints only.

Owns the BPF program bpf/triage.bpf.c; hands raw per-key counters and stacks to
tracer/engine/triage.py. Nothing here symbolizes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from tracer.probes import bpfprog, doctor
from tracer.probes.base import ProbeSet
from tracer.probes.target import Target

# Optional tracepoints: (category/event of the enter tracepoint, -D flag when present).
_OPTIONAL = [
    ("syscalls/sys_enter_futex_wait", "HAVE_FUTEX_WAIT"),
    ("syscalls/sys_enter_futex_wake", "HAVE_FUTEX_WAKE"),
    ("syscalls/sys_enter_futex_waitv", "HAVE_FUTEX_WAITV"),
    ("syscalls/sys_enter_futex_requeue", "HAVE_FUTEX_REQUEUE"),
    ("exceptions/page_fault_user", "HAVE_PAGE_FAULT_USER"),
]
_ALWAYS = ["syscalls/sys_{}_futex"] + [f"syscalls/sys_{{}}_{s}" for s in
                                       ("mmap", "munmap", "mremap", "mprotect", "madvise", "brk")]
MEMSYS_NAMES = ("mmap", "munmap", "mremap", "mprotect", "madvise", "brk")


@dataclass(frozen=True)
class TriageOptions:
    max_keys: int = 1 << 14
    stack_map_size: int = 1 << 16


@dataclass(frozen=True)
class RawFutex:
    """Kernel counters of one (lock word, caller stack, futex command)."""

    uaddr: int
    stack_id: int
    cmd: int
    calls: int
    private_calls: int
    wait_ns: int
    max_ns: int
    woken: int
    errors: dict[str, int]  # EAGAIN, ETIMEDOUT, EINTR, other
    hist: tuple[int, ...]  # log2 slots of the time spent in the call


@dataclass(frozen=True)
class RawMemsys:
    """Kernel counters of one memory syscall, in total (stack_id None) or per stack."""

    syscall: str
    stack_id: int | None
    calls: int
    errors: int
    ns: int
    bytes: int


class TriageProbes(ProbeSet):
    unwind_depth = 32  # a dozen programs walk; the call site is a few frames past libc
    def __init__(self, options: TriageOptions, unwind: str = "fp") -> None:
        super().__init__(unwind)
        self.options = options
        self.points: list[str] = []  # tracepoints attached (category:event)
        self.has_faults = False
        self.modules_changed = False  # set when the target maps executable code
        self._exec_mmaps = 0
        self._c = bpfprog.constants()

    def program(self, target: Target) -> tuple[str, dict[str, int | str]]:
        defines: dict[str, int | str] = {
            "MAX_KEYS": self.options.max_keys,
            "MAX_STACKS": self.options.stack_map_size,
        }
        present = self._present()
        defines.update({flag: 1 for ev, flag in _OPTIONAL if ev in present})
        return "triage.bpf.c", defines

    @staticmethod
    def _present() -> list[str]:
        """The optional tracepoints this kernel has."""
        tracefs, _ = doctor.find_tracefs()
        events = os.path.join(tracefs or "/sys/kernel/tracing", "events")
        return [ev for ev, _ in _OPTIONAL if os.path.isdir(os.path.join(events, ev))]

    def attach(self, target: Target, stop_at_exit: bool = False) -> None:
        """Compile and attach; `stop_at_exit` makes a launched target stop in _Exit
        (what the allocation probes otherwise do) so its maps outlive its last call."""
        source, defines = self.program(target)
        self._load(source, target, defines)
        present = self._present()
        self.has_faults = "exceptions/page_fault_user" in present
        names = [p.format(d) for p in _ALWAYS for d in ("enter", "exit")]
        names += [ev for ev in present if not ev.startswith("syscalls/")]
        names += [ev.replace("enter", d) for ev in present if ev.startswith("syscalls/")
                  for d in ("enter", "exit")]
        self.points = sorted(n.replace("/", ":") for n in names)
        if stop_at_exit:
            with self._attaching(target, "a uprobe on _Exit"):
                self._stop_at_exit(target)
        self._arm(target)

    def follow_exec(self, target: Target) -> None:
        """The launched command exec'd the program it wraps: what was counted in the
        old address space (stacks into mappings that are gone) is dropped, as the
        allocation probes drop theirs."""
        if self._bpf is not None:
            for table in ("pending", "futexes", "memsys", "memsys_errors", "faults",
                          "counters"):
                self._bpf[table].clear()
            self._exec_mmaps = 0
        super().follow_exec(target)

    def poll(self) -> None:
        """Nothing streams: only notice new executable mappings (the maps changed)."""
        if self._bpf is None:
            return
        n = self._counter("NATRACE_TC_EXEC_MMAPS")
        if n != self._exec_mmaps:
            self._exec_mmaps = n
            self.modules_changed = True

    def _counter(self, macro: str) -> int:
        return int(sum(self._bpf["counters"][ctypes.c_int(self._c[macro])]))

    def counters(self) -> dict[str, int]:
        return {"stack_lost": self._counter("NATRACE_TC_STACK_LOST"),
                "keys_full": self._counter("NATRACE_TC_KEYS_FULL"),
                "faults": self._counter("NATRACE_TC_FAULTS")}

    def futexes(self) -> list[RawFutex]:
        out = []
        for k, v in self._bpf["futexes"].items():
            out.append(RawFutex(
                k.uaddr, k.stack_id, k.cmd, v.calls, v.private_calls, v.wait_ns, v.max_ns,
                v.woken, {"EAGAIN": v.err_eagain, "ETIMEDOUT": v.err_etimedout,
                          "EINTR": v.err_eintr, "other": v.err_other},
                tuple(v.hist)))
        return out

    def memsys(self) -> list[RawMemsys]:
        no_stack = self._c["NATRACE_NO_STACK"]
        return [RawMemsys(MEMSYS_NAMES[k.sys], None if k.stack_id == no_stack else k.stack_id,
                          v.calls, v.errors, v.ns, v.bytes)
                for k, v in self._bpf["memsys"].items()]

    def memsys_errors(self) -> dict[tuple[str, str], int]:
        """(syscall, errno name) -> failed calls."""
        return {(MEMSYS_NAMES[k.sys], errno.errorcode.get(k.err, str(k.err))): v.value
                for k, v in self._bpf["memsys_errors"].items()}

    def faults(self) -> dict[int, int]:
        """Stack id -> page faults."""
        if not self.has_faults:
            return {}
        return {k.value: v.value for k, v in self._bpf["faults"].items()}


