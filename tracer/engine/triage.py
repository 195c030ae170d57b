"""Raw triage figures -> model LockReport, SyscallSummary, FaultSummary.

Stacks (walked through libc with its CFI, bpf/stacks.bpf.h) are symbolized, charged to
the first frame outside libc and libstdc++, and grouped by that function. Locks get
their verdict here.
"""

from __future__ import annotations

from collections.abc import Iterable

from tracer.engine.callsites import CallSites
from tracer.model.callsite import CallSite
from tracer.model.faults import FaultSite, FaultSummary
from tracer.model.locks import BLOCKING, FutexSite, Lock, LockReport, command_name
from tracer.model.syscalls import MemSyscall, SyscallSite, SyscallSummary
from tracer.probes.triage import MEMSYS_NAMES, RawFutex, RawMemsys, TriageProbes
from tracer.symbols.attribution import normalize_symbol

# What a lock word is, from the libc function its waiters went through.
_KINDS = [("cond", "condvar"), ("rwlock", "rwlock"), ("sem_", "semaphore"),
          ("barrier", "barrier"), ("join", "thread join"), ("clockwait_tid", "thread join"),
          ("mutex", "mutex"), ("lll_lock", "mutex")]
#: Kinds whose waits are a thread idling until signalled, not lock contention
#: (a thread pool's workers sleep on a semaphore or condvar until work arrives).
IDLE_KINDS = frozenset({"condvar", "semaphore", "barrier", "thread join"})


class TriageBuilder:
    def __init__(self, probes: TriageProbes, call_sites: CallSites) -> None:
        self.probes = probes
        self.call_sites = call_sites

    def call_site(self, stack_id: int, exact_pc: bool = False) -> CallSite:
        return self.call_sites.call_site(stack_id, self.probes.stack, exact_pc=exact_pc)

    # -- locks ----------------------------------------------------------------------

    def locks(self, raw: Iterable[RawFutex], duration: float, share_threshold: float,
              p99_threshold_ns: int) -> LockReport:
        by_word: dict[int, dict[tuple[bool, tuple[str, str]], FutexSite]] = {}
        private: dict[int, bool] = {}
        for r in raw:
            name = command_name(r.cmd)
            site = self.call_site(r.stack_id)
            key = (name in BLOCKING, _function_key(site))
            fs = by_word.setdefault(r.uaddr, {}).get(key)
            if fs is None:
                fs = by_word[r.uaddr][key] = FutexSite(site, hist=[0] * len(r.hist))
            fs.commands[name] = fs.commands.get(name, 0) + r.calls
            fs.calls += r.calls
            fs.ns += r.wait_ns
            fs.max_ns = max(fs.max_ns, r.max_ns)
            fs.hist = [a + b for a, b in zip(fs.hist, r.hist, strict=True)]
            fs.woken += r.woken
            for err, n in r.errors.items():
                fs.errors[err] = fs.errors.get(err, 0) + n
            private[r.uaddr] = private.get(r.uaddr, True) and r.private_calls == r.calls
        locks = []
        for uaddr, sites in by_word.items():
            waiters = sorted((fs for (blocking, _), fs in sites.items() if blocking),
                             key=lambda f: -f.ns)
            wakers = sorted((fs for (blocking, _), fs in sites.items() if not blocking),
                            key=lambda f: -f.calls)
            lock = Lock(uaddr, _kind(waiters or wakers), private[uaddr], waiters, wakers)
            lock.share = lock.wait_ns / (duration * 1e9) if duration > 0 else 0.0
            if lock.kind not in IDLE_KINDS and lock.waits:
                if lock.share > share_threshold:
                    lock.rules.append("share")
                if lock.p(0.99) > p99_threshold_ns:
                    lock.rules.append("p99")
            locks.append(lock)
        locks.sort(key=lambda lk: (not lk.contended, -lk.wait_ns, -lk.wake_calls, lk.uaddr))
        return LockReport(locks, share_threshold, p99_threshold_ns)

    # -- memory syscalls --------------------------------------------------------------

    def syscalls(self, raw: Iterable[RawMemsys], errors: dict[tuple[str, str], int],
                 duration: float) -> SyscallSummary:
        rows = {name: MemSyscall(name) for name in MEMSYS_NAMES}
        grouped: dict[str, dict[tuple[str, str], SyscallSite]] = {}
        for r in raw:
            row = rows[r.syscall]
            if r.stack_id is None:
                row.calls, row.ns, row.bytes = r.calls, r.ns, r.bytes
                continue
            site = self.call_site(r.stack_id)
            ss = grouped.setdefault(r.syscall, {}).setdefault(_function_key(site),
                                                              SyscallSite(site))
            ss.calls += r.calls
            ss.errors += r.errors
            ss.ns += r.ns
            ss.bytes += r.bytes
        for (name, err), n in errors.items():
            rows[name].errors[err] = n
        for name, sites in grouped.items():
            rows[name].sites = sorted(sites.values(), key=lambda s: (-s.calls, -s.bytes))
        return SyscallSummary(duration, list(rows.values()))

    # -- page faults ------------------------------------------------------------------

    def faults(self, raw: dict[int, int], total: int) -> FaultSummary:
        if not self.probes.has_faults:
            return FaultSummary(False)
        grouped: dict[tuple[str, str], FaultSite] = {}
        for stack_id, n in raw.items():
            site = self.call_site(stack_id, exact_pc=True)  # the faulting instruction
            fs = grouped.setdefault(_function_key(site), FaultSite(site, 0))
            fs.faults += n
        return FaultSummary(True, total, sorted(grouped.values(), key=lambda f: -f.faults))


def _function_key(site: CallSite) -> tuple[str, str]:
    frame = site.frame
    if frame is None:
        return ("", f"lost:{site.lost_stack}")
    if frame.symbol:
        return (frame.module, frame.symbol)
    return (frame.module, f"{frame.module_offset:#x}" if frame.module else f"{frame.address:#x}")


def _kind(sites: list[FutexSite]) -> str:
    for fs in sites:
        via = fs.site.via
        if via:
            name = normalize_symbol(via).lower()
            for needle, kind in _KINDS:
                if needle in name:
                    return kind
    return "futex"
