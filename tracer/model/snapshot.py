"""One moment of a traced process: every site that holds memory, and what was lost."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tracer.model.faults import FaultSummary
from tracer.model.handles import HandleType
from tracer.model.locks import LockReport
from tracer.model.memory import MemoryReport
from tracer.model.sites import Site
from tracer.model.syscalls import SyscallSummary
from tracer.model.unwinding import Unwinding
from tracer.units import format_size

# What the pipeline could not record, by name, with the sentence a report prints.
LOSS_DESCRIPTIONS = {
    "stack_efault": "stack walks that faulted",
    "stack_full": "stacks lost: stack map full (raise --stack-map-size)",
    "stack_enomem": "stacks lost: no kernel memory for a new stack",
    "stack_other": "stacks lost for other reasons",
    "untracked": "allocations not tracked: outstanding map full (raise --max-allocs)",
    "untracked_bytes": "bytes in untracked allocations",
    "sites_full": "allocations not tracked: site map full",
    "stale": "blocks reused without a traced free (freed through an untraced path)",
    "events_lost": "mapping events lost: ring buffer full",
    "unreturned": "allocator calls that never returned (longjmp, thread gone mid-call): "
                  "not recorded",
    "stack_lost": "triage events whose stack could not be captured",
    "keys_full": "triage events not counted: aggregation map full",
    "sampler_dropped": "sample points the process dropped: its sampled-address set was full",
}


@dataclass(frozen=True)
class Totals:
    """The program's figures summed over its sites (allocator-internal ones left out):
    unfreed bytes and blocks; allocations made while traced (freed or not) and their
    bytes; the temporary ones among them; the peak seen (see Snapshot.peak_bytes)."""

    bytes: int
    blocks: int
    sites: int  # sites that allocated or hold memory
    holding_sites: int  # ... of which still hold memory
    allocs: int
    alloc_bytes: int
    temp_allocs: int
    temp_bytes: int
    peak_bytes: int | None


@dataclass
class Process:
    """One process of a traced tree: the one natrace was given (`parent` 0) or one it
    forked, followed. `followed`: the commands it exec'd on from."""

    pid: int
    command: str
    parent: int = 0
    exited: bool = False
    followed: list[str] = field(default_factory=list)


@dataclass
class Snapshot:
    pid: int
    command: str
    taken_at: float  # seconds since the epoch
    duration: float  # seconds traced
    sample_bytes: int = 0  # 0: exact; else byte-weighted sampling period
    min_age: float = 0.0
    sites: list[Site] = field(default_factory=list)
    loss: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    target_exited: bool = False
    exit_code: int | None = None
    memory: MemoryReport | None = None  # RSS timeline, regions, arenas, books, split, verdict
    allocs: bool = True  # False: triage mode (no malloc-family probes)
    locks: LockReport | None = None  # futex waits per lock word (triage probes)
    syscalls: SyscallSummary | None = None  # mmap, munmap, mremap, mprotect, madvise, brk
    faults: FaultSummary | None = None  # user page faults per call site
    triage_loss: dict[str, int] = field(default_factory=dict)  # what the triage probes lost
    handles: list[HandleType] = field(default_factory=list)  # create/destroy pairs traced
    notes: list[str] = field(default_factory=list)  # about the session: exec, children
    in_process: bool = False  # the process sampled itself (otel_memory USDT probes)
    # most bytes traced malloc blocks held at the session's once-a-second samples and at
    # the snapshot (a lower bound of the true peak; None: not known)
    peak_bytes: int | None = None
    unwinding: Unwinding | None = None  # how stacks were walked, early ends by reason
    # every process traced, the one natrace was given first; its sites are those whose
    # pid is its own (empty: one process, an older recording)
    processes: list[Process] = field(default_factory=list)

    @property
    def mode(self) -> str:
        if not self.allocs:
            return "triage"
        if self.in_process:
            mean = format_size(self.sample_bytes) if self.sample_bytes else "its own"
            return f"sampled (in-process, mean {mean})"
        return "sampled" if self.sample_bytes else "full"

    @property
    def estimated(self) -> bool:
        """Are the byte and block figures estimates (sampled) rather than counts?"""
        return bool(self.sample_bytes) or self.in_process

    def traced_processes(self) -> list[Process]:
        """Every process traced, the one natrace was given first (a recording made before
        natrace followed children has one)."""
        return self.processes or [Process(self.pid, self.command, 0, self.target_exited)]

    def pid_tag(self, site: Site) -> str:
        """` [PID 123]` after a site's label when several processes were traced: the
        same function in two of them is two sites. Nothing for one process."""
        return f" [PID {site.pid or self.pid}]" if len(self.processes) > 1 else ""

    def process_sites(self, pid: int) -> list[Site]:
        """The sites of one traced process."""
        return [s for s in self.sites if (s.pid or self.pid) == pid]

    def of_process(self, proc: Process) -> Snapshot:
        """The snapshot narrowed to one of its processes: its own sites and command."""
        return replace(self, pid=proc.pid, command=proc.command,
                       sites=self.process_sites(proc.pid), processes=[proc],
                       peak_bytes=None if len(self.processes) > 1 else self.peak_bytes)

    def user_sites(self) -> list[Site]:
        """Sites of the program (not the allocator's own mappings), those whose blocks
        were all freed included: they count in allocated, allocations and temporary."""
        return [s for s in self.sites if not s.allocator_internal]

    def holding_sites(self) -> list[Site]:
        """User sites that still hold memory (unfreed bytes), most first."""
        return [s for s in self.user_sites() if s.holds]

    def runtime_sites(self) -> list[Site]:
        """The runtime's own memory: malloc arenas and heap growth, thread stacks."""
        return [s for s in self.sites if s.allocator_internal]

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.user_sites())

    def total_blocks(self) -> int:
        return sum(s.blocks for s in self.user_sites())

    def totals(self) -> Totals:
        user = self.user_sites()
        return Totals(bytes=sum(s.bytes for s in user), blocks=sum(s.blocks for s in user),
                      sites=len(user), holding_sites=sum(1 for s in user if s.holds),
                      allocs=sum(s.allocs for s in user),
                      alloc_bytes=sum(s.alloc_bytes for s in user),
                      temp_allocs=sum(s.temp_allocs for s in user),
                      temp_bytes=sum(s.temp_bytes for s in user), peak_bytes=self.peak_bytes)

    def by_module(self) -> list[tuple[str, int, int, list[Site]]]:
        """(module class, bytes, blocks, its sites) for user sites, largest first."""
        groups: dict[str, list[Site]] = {}
        for site in self.user_sites():
            groups.setdefault(site.module_class, []).append(site)
        rows = [(name, sum(s.bytes for s in sites), sum(s.blocks for s in sites), sites)
                for name, sites in groups.items()]
        return sorted(rows, key=lambda r: (-r[1], r[0]))

    def lost_anything(self) -> bool:
        return any(self.loss.values())
