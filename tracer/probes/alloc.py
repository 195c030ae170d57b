"""Allocation probes: the malloc family (uprobes) and anonymous mappings (tracepoints).

Owns the BPF program bpf/alloc.bpf.c; hands raw per-stack counters, stacks and
live mapping ranges to the aggregator. Nothing here symbolizes or formats.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from tracer.errors import TargetError
from tracer.model.mappings import MappingTracker, Owner
from tracer.probes import bpfprog
from tracer.probes.allocators import EntryPoint, find_entry_points
from tracer.probes.base import ProbeSet, exited_while_attaching, map_items
from tracer.probes.placement import probe_offset
from tracer.probes.sampler import DEFAULT_PERIOD, Counters, SamplerConfig
from tracer.probes.target import Target, shares_memory
from tracer.probes.usdt import UsdtProbe, otel_probes
from tracer.symbols.unwind import splice_caller

_COUNTERS = {
    "stack_efault": "NATRACE_CNT_STACK_EFAULT",
    "stack_full": "NATRACE_CNT_STACK_FULL",
    "stack_enomem": "NATRACE_CNT_STACK_ENOMEM",
    "stack_other": "NATRACE_CNT_STACK_OTHER",
    "untracked": "NATRACE_CNT_UNTRACKED",
    "untracked_bytes": "NATRACE_CNT_UNTRACKED_BYTES",
    "sites_full": "NATRACE_CNT_SITES_FULL",
    "stale": "NATRACE_CNT_STALE",
    "events_lost": "NATRACE_CNT_EVENTS_LOST",
    "unreturned": "NATRACE_CNT_UNRETURNED",
}
_CALL_COUNTERS = {
    "allocs": "NATRACE_CNT_ALLOC_CALLS",
    "frees": "NATRACE_CNT_FREE_CALLS",
    "sampled_out": "NATRACE_CNT_SAMPLED_OUT",
}


@dataclass(frozen=True)
class AllocOptions:
    sample_bytes: int = 0  # uprobes: in-kernel sampling period; in-process: the mean asked
    max_allocs: int = 1 << 19
    stack_map_size: int = 1 << 16
    ringbuf_pages: int = 256
    # "auto": the process's own sampler when it has otel_memory probes, else uprobes on
    # the allocator; "exact": uprobes always; "in-process": the sampler or an error
    probes: str = "auto"


@dataclass(frozen=True)
class RawSite:
    """Kernel counters of one stack id (negative: -errno of a failed capture): bytes and
    blocks outstanding; allocations, bytes allocated and the temporary ones among them
    since attach; the most bytes held at once; first and latest allocation
    (CLOCK_MONOTONIC ns, 0: none)."""

    stack_id: int
    bytes: int
    blocks: int
    allocs: int
    alloc_bytes: int
    samples: int = 0  # sampled in the process: sampled blocks outstanding
    alloc_samples: int = 0  # ... and sampled allocations since attach
    temp_allocs: int = 0
    temp_bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    pid: int = 0  # the process whose address space the stack is of


@dataclass(frozen=True)
class ProbePoint:
    """Where one allocator function was probed, for reports and the benchmark."""

    path: str
    symbol: str
    offset: int
    has_return: bool


class AllocProbes(ProbeSet):
    def __init__(self, options: AllocOptions, unwind: str = "fp") -> None:
        super().__init__(unwind)
        self.options = options
        self.points: list[ProbePoint] = []
        self._mappings: dict[int, MappingTracker] = {}  # per process (tgid)
        self.modules_changed = False  # set when the target maps executable code
        self._c = bpfprog.constants()
        self._shift = self._c["NATRACE_BLOCK_SHIFT"]
        self.in_process = False  # the process samples itself (otel_memory probes)
        self.period = 0  # in-process: mean bytes between samples (0: the process's own)
        self._samplers: list[SamplerConfig] = []
        self._sampler_libs: list[str] = []
        self._target_pid = 0
        self._root = 0  # the process natrace was given
        self._probed: dict[int, set[tuple[int, int] | None]] = {}  # pid -> files probed

    def program(self, target: Target) -> tuple[str, dict[str, int | str]]:
        usdt = self._usdt(target)
        defines: dict[str, int | str] = {
            "SAMPLE_BYTES": 0 if usdt else self.options.sample_bytes,
            "MAX_ALLOCS": self.options.max_allocs,
            "MAX_STACKS": self.options.stack_map_size,
            "RINGBUF_PAGES": self.options.ringbuf_pages,
            "TARGET_PAGE_SIZE": os.sysconf("SC_PAGE_SIZE"),
        }
        if usdt:
            defines["USDT_SAMPLED"] = 1
        return "alloc.bpf.c", defines

    def _usdt(self, target: Target) -> list[UsdtProbe]:
        """The otel_memory probes to attach to instead of the allocator (none: exact)."""
        return [] if self.options.probes == "exact" else otel_probes(target.mapped_files())

    def attach(self, target: Target) -> None:
        usdt = self._usdt(target)
        entry_points = ([] if usdt else
                        find_entry_points(target.mapped_files(), target.executable()))
        in_process_missing = self.options.probes == "in-process" and not usdt
        if in_process_missing or not (usdt or any(ep.family_name == "malloc"
                                                   for ep in entry_points)):
            if not target.alive():  # its maps were read empty, or half
                raise exited_while_attaching(target)
            if in_process_missing:
                raise TargetError(f"process {target.pid} has no otel_memory probes: start it "
                                  "with LD_PRELOAD=$(natrace sampler-path), or use natrace run "
                                  "--sampled")
            raise TargetError(f"process {target.pid} maps no known allocator (no malloc found)")
        self.in_process = bool(usdt)
        source, defines = self.program(target)
        self._root = target.pid
        self._load(source, target, defines)
        with self._attaching(target, "uprobes"):
            if usdt:
                self._attach_in_process(target, usdt)
            for ep in entry_points:
                self._attach_entry_point(ep, target.pid)
            self._stop_at_exit(target)
        self._bpf["mem_events"].open_ring_buffer(self._on_mem_event)
        self._arm(target)

    def _attach_in_process(self, target: Target, usdt: list[UsdtProbe]) -> None:
        """The process's otel_memory probes, with the kernel counting their semaphores
        in (so the process leaves its dormant path) and out at detach. natrace's own
        sampler gets its period first; a launched one reads it from its environment."""
        self.period = self.options.sample_bytes or DEFAULT_PERIOD
        self._target_pid = target.pid
        self._sampler_libs = sorted({p.path for p in usdt})
        if not target.launched:
            self._samplers = [c for c in (SamplerConfig.find(target.pid, lib)
                                          for lib in self._sampler_libs) if c]
            for config in self._samplers:
                config.set_period(self.period)
            if not self._samplers:
                self.period = 0  # another otel_memory provider: its period is its own
        # frees first: the process keeps a sampled address for its free only while the
        # free probe is on
        for p in sorted(usdt, key=lambda p: p.name != "free"):
            program = "otel_alloc" if p.name == "alloc" else "free_enter"
            bpfprog.attach_counted_uprobe(self._bpf, program, p.path, p.offset, target.pid,
                                          p.semaphore_offset)
            self.points.append(ProbePoint(p.path, f"otel_memory:{p.name}", p.offset, False))

    def sampler_counters(self) -> Counters | None:
        """What the process's sampler says it fired and dropped (summed over copies)."""
        if self.in_process and not self._samplers and self._target_pid:
            self._samplers = [c for c in (SamplerConfig.find(self._target_pid, lib)
                                          for lib in self._sampler_libs) if c]
        read = [c for c in (s.read() for s in self._samplers) if c]
        if not read:
            return None
        return Counters(read[0].period, sum(c.sampled for c in read),
                        sum(c.dropped for c in read))

    def forks(self) -> dict[int, tuple[str, bool, bool]]:
        """Child processes (and live threads) the traced processes forked:
        pid -> (comm, exited, traced)."""
        if self._bpf is None:
            return {}
        return {k.value: (bytes(v.comm).split(b"\0", 1)[0].decode(errors="replace"),
                          bool(v.exited), bool(v.traced))
                for k, v in self._bpf["forks"].items()}

    def follow_children(self) -> None:
        """From now on the processes a traced one forks are traced too: each stops at
        birth (bpf/alloc.bpf.c) until add_process() has probed it."""
        if self._bpf is not None:
            self._bpf["follow_children"][ctypes.c_int(0)] = ctypes.c_uint32(1)

    def add_process(self, target: Target) -> None:
        """A child of a traced process, stopped at birth: its uprobes (they filter by
        process) on its allocator files, its _Exit stop; it records once resumed. A
        vfork child runs in its parent's address space until it execs: the parent's
        uprobes already fire for it (they filter by address space), and its own would
        run every probe twice; it gets its own at its exec."""
        if not shares_memory(target.pid, target.parent):
            self._probe_files(target)
        self.clear_stop(target.pid)

    def follow_exec(self, target: Target) -> None:
        """A traced process exec'd another program: its old address space and everything
        recorded in it are gone. Probe the new program's allocator files not probed yet
        for it, then record from its first instruction."""
        if self._bpf is None:
            return
        self.poll()  # the old program's last mapping events, dropped with its tracker
        self._forget(target.pid)
        self._probe_files(target)
        super().follow_exec(target)

    def _probe_files(self, target: Target) -> None:
        probed = set(self._probed.get(target.pid, ()))  # files, not entry points
        for ep in find_entry_points(target.mapped_files(), target.executable()):
            if _inode(ep.path) not in probed:
                self._attach_entry_point(ep, target.pid)
        self._stop_at_exit(target)

    def _forget(self, pid: int) -> None:
        """Drop what was recorded in a process's old address space."""
        tables = [self._bpf[name] for name in ("allocs", "sites")]
        for table in tables:
            for key in [k for k, _v in map_items(table) if k.tgid == pid]:
                with contextlib.suppress(KeyError):
                    del table[key]
        for name in ("entries", "pending"):
            with contextlib.suppress(KeyError):
                del self._bpf[name][ctypes.c_uint32(pid)]
        if len(self.procs()) <= 1:
            self._bpf["counters"].clear()  # one process: the report is of the last program
        self._mappings.pop(pid, None)

    def mappings(self, pid: int) -> MappingTracker:
        """The live anonymous mappings and brk growth of one traced process."""
        return self._mappings.setdefault(pid, MappingTracker())

    def _attach_entry_point(self, ep: EntryPoint, pid: int) -> None:
        offset = entry_probe_offset(ep)
        self._bpf.attach_uprobe(name=ep.path, addr=ep.vaddr + offset, fn_name=ep.program, pid=pid)
        if ep.has_return:
            self._bpf.attach_uretprobe(name=ep.path, addr=ep.vaddr, fn_name="alloc_return",
                                       pid=pid)
        self._probed.setdefault(pid, set()).add(_inode(ep.path))
        if pid == self._root:
            self.points.append(ProbePoint(ep.path, ep.symbol, offset, ep.has_return))

    def poll(self) -> None:
        """Drain streamed mapping events (the producer never wakes us: we poll)."""
        if self._bpf is not None:
            self._bpf.ring_buffer_consume()

    def _on_mem_event(self, _ctx: Any, data: Any, _size: int) -> None:
        ev = self._bpf["mem_events"].event(data)
        kind = ev.kind
        tracker = self.mappings(ev.tgid)
        c = self._c
        internal = bool(ev.flags & c["NATRACE_EVF_ALLOCATOR"])
        if ev.flags & c["NATRACE_EVF_EXEC"]:
            self.modules_changed = True
        if kind == c["NATRACE_EV_MMAP"]:
            if ev.flags & c["NATRACE_EVF_ANON"]:
                owner = Owner(self._syscall_stack(ev.stack_id, ev.caller), "mmap", internal)
                tracker.mmap(ev.addr, ev.len, owner)
            else:
                tracker.munmap(ev.addr, ev.len)  # a file mapping replaced the range
        elif kind == c["NATRACE_EV_MUNMAP"]:
            tracker.munmap(ev.addr, ev.len)
        elif kind == c["NATRACE_EV_MREMAP"]:
            tracker.mremap(ev.addr, ev.len, ev.new_addr, ev.new_len)
        elif kind == c["NATRACE_EV_BRK"]:
            owner = Owner(self._syscall_stack(ev.stack_id, ev.caller), "brk", internal)
            tracker.brk(ev.addr, owner)

    def site_stack(self, stack_id: int) -> tuple[int, ...]:
        """The stack of an allocation site, frame 0 a return address as the symbolizer
        expects. In-process, the capture at the otel_memory:alloc probe starts at the
        probe's own pc (the provider's probe site, e.g. the sampler's fire_alloc), which
        is no return address: it is left out, the provider's callers stay (charged past)."""
        stack = self.stack(stack_id)
        return stack[1:] if self.in_process else stack

    def _syscall_stack(self, stack_id: int, caller: int) -> tuple[int, ...]:
        """The stack of a syscall, with the wrapper's caller put back in: the
        frame-pointer walk from inside a libc wrapper skips it."""
        return splice_caller(self.stack(stack_id), caller)

    def sites(self) -> list[RawSite]:
        """Per-stack counters, the CPUs' copies summed (see site_stats in natrace.h)."""
        shift = self._shift
        out = []
        for key, copies in map_items(self._bpf["sites"]):
            allocs_fp = sum(c.allocs_fp for c in copies)
            blocks_fp = sum(c.blocks_fp for c in copies)
            if allocs_fp == 0 and blocks_fp == 0:
                continue
            out.append(RawSite(key.stack_id, sum(c.bytes for c in copies), blocks_fp >> shift,
                               allocs_fp >> shift, sum(c.alloc_bytes for c in copies),
                               sum(getattr(c, "samples", 0) for c in copies),
                               sum(getattr(c, "alloc_samples", 0) for c in copies),
                               sum(c.temp_fp for c in copies) >> shift,
                               sum(c.temp_bytes for c in copies),
                               min((c.first_ns for c in copies if c.first_ns), default=0),
                               max(c.last_ns for c in copies), key.tgid))
        return out

    def sites_older_than(self, min_age: float) -> list[RawSite]:
        """Every stack's counters, with bytes and blocks outstanding narrowed to the
        blocks at least `min_age` seconds old (allocations made stay all of them)."""
        cutoff = time.monotonic_ns() - int(min_age * 1e9)
        acc: dict[tuple[int, int], list[int]] = {}
        for key, info in self._iter_allocs():
            if info.ts_ns > cutoff:
                continue
            slot = acc.setdefault((key.tgid, info.stack_id), [0, 0, 0])
            slot[0] += self._weight_bytes(info)
            slot[1] += self._weight_blocks_fp(info)
            slot[2] += 1
        none = [0, 0, 0]
        return [replace(r, bytes=acc.get((r.pid, r.stack_id), none)[0],
                        blocks=acc.get((r.pid, r.stack_id), none)[1] >> self._shift,
                        samples=acc.get((r.pid, r.stack_id), none)[2] if self.in_process
                        else 0)
                for r in self.sites()]

    def _iter_allocs(self) -> Iterator[tuple[Any, Any]]:
        return map_items(self._bpf["allocs"])

    def _weight_bytes(self, info: Any) -> int:
        """The same weights as bpf/alloc.bpf.c's weight_bytes and weight_blocks_fp."""
        if self.in_process:
            return int(info.weight)
        rate = self.options.sample_bytes
        return max(info.size, rate) if rate else int(info.size)

    def _weight_blocks_fp(self, info: Any) -> int:
        size = max(int(info.size), 1)
        if self.in_process:
            return (int(info.weight) << self._shift) // size
        rate = self.options.sample_bytes
        if rate and size < rate:
            return (rate << self._shift) // size
        return 1 << self._shift

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(what was lost, call counts), summed over CPUs."""
        table = self._bpf["counters"]

        def total(macro: str) -> int:
            return int(sum(table[ctypes.c_int(self._c[macro])]))

        loss = {name: total(m) for name, m in _COUNTERS.items()}
        calls = {name: total(m) for name, m in _CALL_COUNTERS.items()}
        if self.in_process:
            del calls["sampled_out"]
            sampler = self.sampler_counters()
            if sampler is not None:
                loss["sampler_dropped"] = sampler.dropped
                calls["sampler_fired"] = sampler.sampled
        return loss, calls



def entry_probe_offset(ep: EntryPoint) -> int:
    """Where in `ep` its entry uprobe goes: past free's NULL test when that reaches an
    emulated instruction; 0 for every other function (a uretprobe, or a wrapper's
    entry probe, reads the return address on top of the stack). Public so the
    benchmark's empty-probe floor sits exactly where natrace's probes do."""
    if not ep.null_first_arg_ignored:
        return 0
    return probe_offset(ep.path, ep.file_offset, ep.size)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def stack_error_name(stack_id: int) -> str:
    return errno.errorcode.get(-stack_id, str(-stack_id))
