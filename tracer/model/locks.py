"""Futex activity per lock word: who waits, how long, who wakes, and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.callsite import CallSite

# FUTEX_* commands (op & 127) and natrace's pseudo-commands for the futex2 syscalls.
FUTEX_COMMANDS = {
    0: "WAIT", 1: "WAKE", 2: "FD", 3: "REQUEUE", 4: "CMP_REQUEUE", 5: "WAKE_OP",
    6: "LOCK_PI", 7: "UNLOCK_PI", 8: "TRYLOCK_PI", 9: "WAIT_BITSET", 10: "WAKE_BITSET",
    11: "WAIT_REQUEUE_PI", 12: "CMP_REQUEUE_PI", 13: "LOCK_PI2",
    64: "futex_wait", 65: "futex_wake", 66: "futex_waitv", 67: "futex_requeue",
}
#: Commands that block the caller until woken: their time in the call is wait time.
BLOCKING = frozenset({"WAIT", "WAIT_BITSET", "LOCK_PI", "LOCK_PI2", "WAIT_REQUEUE_PI",
                      "futex_wait", "futex_waitv"})

ERROR_EXPLANATIONS = {
    "EAGAIN": "the lock word changed before the thread could sleep: a race typical of "
              "contention, not a failure",
    "ETIMEDOUT": "a timed wait ran out",
    "EINTR": "a signal interrupted the wait",
    "other": "other errors (EFAULT, EINVAL, ...): a bug or a misused futex",
}


def command_name(cmd: int) -> str:
    return FUTEX_COMMANDS.get(cmd, f"op{cmd}")


def percentile_ns(hist: list[int], q: float, max_ns: int) -> int:
    """The q-quantile of a log2 histogram (slot i: [2^i, 2^(i+1)) ns), as the slot's
    upper bound, never above the largest value seen."""
    total = sum(hist)
    if not total:
        return 0
    need = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= need:
            return min(2 ** (i + 1), max_ns) if max_ns else 2 ** (i + 1)
    return max_ns


@dataclass
class FutexSite:
    """The calls on one lock word from one call site, in one role (wait or wake)."""

    site: CallSite
    commands: dict[str, int] = field(default_factory=dict)  # command name -> calls
    calls: int = 0
    ns: int = 0  # time in the calls (for waits: time blocked)
    max_ns: int = 0
    hist: list[int] = field(default_factory=list)
    woken: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # EAGAIN, ETIMEDOUT, EINTR, other

    def p(self, q: float) -> int:
        return percentile_ns(self.hist, q, self.max_ns)


@dataclass
class Lock:
    """One futex word (a mutex, condvar, semaphore, ... word) and its verdict."""

    uaddr: int
    kind: str  # what the waiters went through: "mutex", "condvar", "rwlock", ..., "futex"
    private: bool
    waiters: list[FutexSite] = field(default_factory=list)
    wakers: list[FutexSite] = field(default_factory=list)
    share: float = 0.0  # blocked time summed over threads / traced time: threads waiting
    #                     on average (above 1 when several wait at once)
    rules: list[str] = field(default_factory=list)  # verdict rules that fired

    @property
    def contended(self) -> bool:
        return bool(self.rules)

    @property
    def waits(self) -> int:
        return sum(w.calls for w in self.waiters)

    @property
    def wait_ns(self) -> int:
        return sum(w.ns for w in self.waiters)

    @property
    def max_ns(self) -> int:
        return max((w.max_ns for w in self.waiters), default=0)

    @property
    def hist(self) -> list[int]:
        slots = max((len(w.hist) for w in self.waiters), default=0)
        return [sum(w.hist[i] for w in self.waiters if i < len(w.hist)) for i in range(slots)]

    def p(self, q: float) -> int:
        return percentile_ns(self.hist, q, self.max_ns)

    @property
    def wake_calls(self) -> int:
        return sum(w.calls for w in self.wakers)

    @property
    def woken(self) -> int:
        return sum(w.woken for w in self.wakers)

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.waiters + self.wakers:
            for name, n in w.errors.items():
                if n:
                    out[name] = out.get(name, 0) + n
        return out


@dataclass
class LockReport:
    """Every lock word seen, contended ones first, and the thresholds used."""

    locks: list[Lock] = field(default_factory=list)
    share_threshold: float = 0.05
    p99_threshold_ns: int = 10_000_000

    def contended(self) -> list[Lock]:
        return [lk for lk in self.locks if lk.contended]

    def waited_on(self) -> list[Lock]:
        """Locks some thread blocked on (words only ever woken tell nothing)."""
        return [lk for lk in self.locks if lk.waits]

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for lk in self.locks:
            for name, n in lk.errors.items():
                out[name] = out.get(name, 0) + n
        return out
