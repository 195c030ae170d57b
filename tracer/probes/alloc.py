"""Allocation probes: the malloc family (uprobes) and anonymous mappings (tracepoints).

Owns the BPF program bpf/alloc.bpf.c; hands raw per-stack counters, stacks and
live mapping ranges to the aggregator. Nothing here symbolizes or formats.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from tracer.errors import TargetError
from tracer.model.mappings import MappingTracker, Owner
from tracer.probes import bpfprog, kernelbtf, syscallsites
from tracer.probes.allocators import EntryPoint, find_entry_points, inode_of
from tracer.probes.base import ProbeSet, exited_while_attaching, map_items
from tracer.probes.placement import probe_offset
from tracer.probes.sampler import DEFAULT_PERIOD, Counters, SamplerConfig, firing_probes
from tracer.probes.target import Target, shares_memory
from tracer.probes.usdt import UsdtProbe
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

    def table_defines(self) -> dict[str, int]:
        """The outstanding-block table's size (bpf/alloc.bpf.c): max_allocs blocks, half
        or more of them in the buckets (8 slots each, a power of two of them), the rest in
        the spill hash that takes the blocks of full buckets."""
        bits = max(6, (self.max_allocs // (2 * _BUCKET_SLOTS)).bit_length() - 1)  # 6: natrace.h
        slots = _BUCKET_SLOTS << bits
        return {"BUCKET_BITS": bits, "MAX_SPILLS": max(64, self.max_allocs - slots)}


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
        # in-process: each traced process's copies of natrace's sampler, with what their
        # counters said when natrace began counting that process image (see fired())
        self._samplers: dict[int, list[tuple[SamplerConfig, Counters]]] = {}
        self._sampler_libs: list[str] = []
        self._fresh: set[int] = set()  # processes whose image natrace saw begin (count from 0)
        self._final: set[int] = set()  # processes whose samplers were read held in _Exit
        self._root = 0  # the process natrace was given
        self._probed: dict[int, set[tuple[int, int] | None]] = {}  # pid -> files probed
        self.notes: list[str] = []  # what the report must say about how allocations were seen
        self._exec_from_thread_noted = False
        self._set_aside_calls: dict[str, int] = {}  # calls of forgotten images (_forget)
        #: Must the memory syscalls come from raw_syscalls? True: yes (triage chains its
        #: programs to them, followed children stop at their fork's return); None: unless
        #: the process samples itself (production mode leaves triage out); False: no.
        #: Otherwise they come from libc's syscall sites where it has them
        #: (tracer/probes/syscallsites.py). Set by the session before attach().
        self.raw_syscalls: bool | None = True
        self.syscall_source = "raw_syscalls"  # or "syscall sites", once attached
        self._site_files: set[tuple[int, tuple[int, int] | None]] = set()  # (pid, inode)
        self._sites: list[syscallsites.SyscallSite] = []
        self._site_pcs: dict[int, int] = {}  # see syscallsites.pc_of

    def program(self, target: Target) -> tuple[str, dict[str, int | str]]:
        usdt, _inert = self._usdt(target)
        defines: dict[str, int | str] = {
            "SAMPLE_BYTES": 0 if usdt else self.options.sample_bytes,
            **self.options.table_defines(),
            "MAX_STACKS": self.options.stack_map_size,
            "RINGBUF_PAGES": self.options.ringbuf_pages,
            "TARGET_PAGE_SIZE": os.sysconf("SC_PAGE_SIZE"),
        }
        if usdt:
            defines["USDT_SAMPLED"] = 1
        defines.update(kernelbtf.task_offsets() or {})
        return "alloc.bpf.c", defines

    def _usdt(self, target: Target) -> tuple[list[UsdtProbe], list[str]]:
        """The otel_memory probes to attach to instead of the allocator (none: exact),
        and the copies of natrace's sampler that would never fire (dlopen'ed)."""
        if self.options.probes == "exact":
            return [], []
        return firing_probes(target.pid, target.mapped_files())

    def attach(self, target: Target) -> None:
        usdt, inert = self._usdt(target)
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
        if inert and not usdt:
            self.notes.append("the in-process sampler was loaded with dlopen, after the "
                              "allocator, and samples nothing: exact uprobes instead "
                              "(preload it, LD_PRELOAD=$(natrace sampler-path), for "
                              "production mode)")
        self.in_process = bool(usdt)
        source, defines = self.program(target)
        self._root = target.pid
        raw = self.raw_syscalls if self.raw_syscalls is not None else not usdt
        sites = None if raw else syscallsites.find(target.mapped_files(), target.executable())
        self.skip_raw_syscalls = sites is not None
        self._load(source, target, defines)
        with self._attaching(target, "uprobes"):
            if usdt:
                self._attach_in_process(target, usdt)
            for ep in entry_points:
                self._attach_entry_point(ep, target.pid)
            if sites is not None:
                self.syscall_source = "syscall sites"
                self._attach_syscall_sites(sites, target.pid)
            self._stop_at_exit(target)
        self._bpf["mem_events"].open_ring_buffer(self._on_mem_event)
        self._arm(target)

    def _attach_in_process(self, target: Target, usdt: list[UsdtProbe]) -> None:
        """The process's otel_memory probes, with the kernel counting their semaphores
        in (so the process leaves its dormant path) and out at detach. natrace's own
        sampler gets its period first; a launched one reads it from its environment."""
        self.period = self.options.sample_bytes or DEFAULT_PERIOD
        self._sampler_libs = sorted({p.path for p in usdt})
        if target.launched:
            self._fresh.add(target.pid)
        else:
            configs = self._find_samplers(target.pid)
            for config, _start in configs:
                config.set_period(self.period)
            if not configs:
                self.period = 0  # another otel_memory provider: its period is its own
        self._attach_usdt(usdt, target.pid)
        for p in usdt:
            self.points.append(ProbePoint(p.path, f"otel_memory:{p.name}", p.offset, False))

    def _attach_usdt(self, usdt: list[UsdtProbe], pid: int) -> None:
        """The otel_memory probes for one process, frees first: the process keeps a
        sampled address for its free only while the free probe is on."""
        for p in sorted(usdt, key=lambda p: p.name != "free"):
            program = "otel_alloc" if p.name == "alloc" else "free_enter"
            self._bpf.attach_uprobe_at(program, p.path, p.offset, pid, p.semaphore_offset)
            self._probed.setdefault(pid, set()).add(inode_of(p.path))

    def _probe_sampler(self, target: Target) -> None:
        """A followed process in production mode: its own otel_memory probes (a forked
        child shares its parent's sampler; an exec'd one has loaded its own), or, with
        none, one line on why it is not traced (the program samples, uprobes would not
        fit it)."""
        usdt, _inert = firing_probes(target.pid, target.mapped_files())
        if not usdt and target.pid == self._root:
            self.notes.append(f"process {target.pid} exec'd {' '.join(target.argv)}, which "
                              "does not load the in-process sampler: nothing it allocates "
                              "is seen (--exact traces any program)")
            return
        if not usdt:
            raise TargetError("no in-process sampler in it: production mode traces the "
                              "processes that preload it (--exact traces any)")
        probed = self._probed.get(target.pid, set())
        self._attach_usdt([p for p in usdt if inode_of(p.path) not in probed], target.pid)
        self._samplers.pop(target.pid, None)  # a new image: counted from here on
        self._sampler_libs = sorted({*self._sampler_libs, *(p.path for p in usdt)})
        self._find_samplers(target.pid)

    def _find_samplers(self, pid: int) -> list[tuple[SamplerConfig, Counters]]:
        """The process's copies of natrace's sampler, each with its counters now (what
        natrace's count of it starts from); found once mapped."""
        if not self._samplers.get(pid):
            found = []
            for lib in self._sampler_libs:
                config = SamplerConfig.find(pid, lib)
                start = config.read() if config is not None else None
                if pid in self._fresh:
                    start = Counters(0, 0, 0)  # loaded since natrace began counting
                if config is not None and start is not None:
                    found.append((config, start))
            self._samplers[pid] = found
        return self._samplers[pid]

    def read_exiting(self, pid: int) -> None:
        """A process held in _Exit: its samplers' last word, before it goes."""
        if self.in_process:
            for config, _start in self._find_samplers(pid):
                config.read()
            self._final.add(pid)

    def sampler_counters(self) -> Counters | None:
        """What the traced processes' samplers say they fired and dropped since natrace
        began counting each (its attach, a child's fork or exec), summed over processes
        and copies: the process's own count of the probes natrace should have seen. Read
        on every poll and while a process is held in _Exit; None when a process went
        without that last reading (an attached one that exited between polls), as the
        sum would then undercount."""
        fired = dropped = 0
        period = None
        for pid in {self._root, *self.procs(), *self._samplers}:  # exited ones too
            for config, start in self._find_samplers(pid):
                now = config.read()
                if config.gone and pid not in self._final:
                    return None
                if now is None:
                    continue
                period = now.period if period is None else period
                fired += now.sampled - start.sampled
                dropped += now.dropped - start.dropped
        return None if period is None else Counters(period, fired, dropped)

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
        run every probe twice; it gets its own at its exec. Its unwind table starts as
        its parent's."""
        if not shares_memory(target.pid, target.parent):
            self._probe_files(target)
        self.adopt_unwind(target.pid, target.parent)
        self.clear_stop(target.pid)

    def follow_exec(self, target: Target) -> None:
        """A traced process exec'd another program: its old address space and everything
        recorded in it are gone. Probe the new program's allocator files not probed yet
        for it, then record from its first instruction."""
        if self._bpf is None:
            return
        self.poll()  # the old program's last mapping events, dropped with its tracker
        self._forget(target.pid)
        self._fresh.add(target.pid)
        self._probe_files(target)
        super().follow_exec(target)
        if self._bpf.links_of_gone_tasks(target.pid) and not self._exec_from_thread_noted:
            self._exec_from_thread_noted = True  # the kernel refused to make them again
            self.notes.append(f"process {target.pid} exec'd from a thread other than its "
                              "main one and natrace's allocator probes could not be placed "
                              "again for it: allocations of "
                              f"'{' '.join(target.argv)}' are not all traced")

    def _attach_syscall_sites(self, sites: list[syscallsites.SyscallSite], pid: int) -> None:
        """The memory syscalls' uprobes for one process, each file once (uprobes live
        on inodes and stay across exec)."""
        for site in sites:
            key = (pid, inode_of(site.path))
            if key not in self._site_files:
                self._bpf.attach_uprobe(name=site.path, addr=site.vaddr, fn_name=site.program,
                                        pid=pid)
        self._site_files |= {(pid, inode_of(site.path)) for site in sites}
        self._sites += sites
        self._site_pcs = syscallsites.pc_of(self._sites)

    def _follow_syscalls(self, target: Target) -> None:
        """A followed exec in a session taking memory syscalls from syscall sites: the
        new program's, or raw_syscalls from now on when it has none (a static one)."""
        if self.syscall_source != "syscall sites":
            return
        sites = syscallsites.find(target.mapped_files(), target.executable())
        if sites is None:
            self.attach_raw_syscalls()
            self.syscall_source = "raw_syscalls"
        else:
            self._attach_syscall_sites(sites, target.pid)

    def _probe_files(self, target: Target) -> None:
        self._follow_syscalls(target)
        if self.in_process:
            self._probe_sampler(target)
            self._stop_at_exit(target)
            return
        probed = set(self._probed.get(target.pid, ()))  # files, not entry points
        for ep in find_entry_points(target.mapped_files(), target.executable()):
            if inode_of(ep.path) not in probed:
                self._attach_entry_point(ep, target.pid)
        self._stop_at_exit(target)

    def _forget(self, pid: int) -> None:
        """Drop what was recorded in a process's old address space: its blocks, sites
        and, from the call counts, the calls they counted (the report is of the last
        program, as the samplers' count, which starts afresh at the exec)."""
        self._set_aside(r for r in self.sites() if r.pid == pid)
        for m, off, at in self._buckets():
            for i in at:
                if self._slot_tgid(_KEY.unpack_from(m, off + 8 * i)[0]) == pid:
                    _KEY.pack_into(m, off + 8 * i, 0)  # stopped at its exec: nothing writes it
        # the spilled ones with the hash's entries below (the kernel's count of them stays
        # over: each call then looks in the hash, exact still)
        tables = [self._bpf[name] for name in ("allocs", "sites")]
        for table in tables:
            for key in [k for k, _v in map_items(table) if k.tgid == pid]:
                with contextlib.suppress(KeyError):
                    del table[key]
        with contextlib.suppress(KeyError):
            del self._bpf["pending"][ctypes.c_uint32(pid)]
        self._bpf.delete_task_storage("entries", pid)
        if len(self.procs()) <= 1:
            self._bpf["counters"].clear()  # one process: the report is of the last program
            self._set_aside_calls = {}
        self._mappings.pop(pid, None)

    def _set_aside(self, sites: Iterator[RawSite]) -> None:
        """Count the allocator calls of sites about to be dropped, to take them out of
        the kernel's call counters (shared by every process, per CPU): the allocations
        and the frees of their blocks (a free is counted only for a block the process
        allocated itself). Calls counted one by one only: sampled in the process (its
        samples) or exact without in-kernel sampling."""
        if not self.in_process and self.options.sample_bytes:
            return
        allocs = frees = 0
        for r in sites:
            made, left = (r.alloc_samples, r.samples) if self.in_process else (r.allocs,
                                                                                r.blocks)
            allocs += made
            frees += made - left
        aside = self._set_aside_calls
        aside["allocs"] = aside.get("allocs", 0) + allocs
        aside["frees"] = aside.get("frees", 0) + frees

    def mappings(self, pid: int) -> MappingTracker:
        """The live anonymous mappings and brk growth of one traced process."""
        return self._mappings.setdefault(pid, MappingTracker())

    def _attach_entry_point(self, ep: EntryPoint, pid: int) -> None:
        offset = entry_probe_offset(ep)
        self._bpf.attach_uprobe(name=ep.path, addr=ep.vaddr + offset, fn_name=ep.program, pid=pid)
        if ep.has_return:
            self._bpf.attach_uretprobe(name=ep.path, addr=ep.vaddr, fn_name="alloc_return",
                                       pid=pid)
        self._probed.setdefault(pid, set()).add(inode_of(ep.path))
        if pid == self._root:
            self.points.append(ProbePoint(ep.path, ep.symbol, offset, ep.has_return))

    def poll(self) -> None:
        """Drain streamed mapping events (the producer never wakes us: we poll); read
        the samplers' counters while their processes live."""
        if self._bpf is not None:
            self._bpf.ring_buffer_consume()
        if self.in_process:
            self.sampler_counters()

    def wakeup_fd(self) -> int | None:
        """A file descriptor that becomes readable when a traced process stops for
        natrace (bpf/alloc.bpf.c's wake_natrace: the ring buffer woken), for the poll
        loop's sleep to end on (edge-triggered: mapping events never wake it)."""
        return None if self._bpf is None else int(self._bpf["mem_events"].map_fd)

    def _on_mem_event(self, _ctx: Any, data: Any, _size: int) -> None:
        ev = self._bpf["mem_events"].event(data)
        kind = ev.kind
        c = self._c
        if kind == c["NATRACE_EV_STOP"]:
            return  # a wake-up only: the poll looks at every process's stop
        tracker = self.mappings(ev.tgid)
        internal = bool(ev.flags & c["NATRACE_EVF_ALLOCATOR"])
        if ev.flags & c["NATRACE_EVF_EXEC"]:
            self.modules_changed = True
        if kind == c["NATRACE_EV_MMAP"]:
            if ev.flags & c["NATRACE_EVF_ANON"]:
                owner = Owner(self._syscall_stack(ev), "mmap", internal)
                tracker.mmap(ev.addr, ev.len, owner,
                             accessible=not ev.flags & c["NATRACE_EVF_NOACCESS"],
                             fixed=bool(ev.flags & c["NATRACE_EVF_FIXED"]))
            else:
                tracker.munmap(ev.addr, ev.len)  # a file mapping replaced the range
        elif kind == c["NATRACE_EV_MUNMAP"]:
            tracker.munmap(ev.addr, ev.len)
        elif kind == c["NATRACE_EV_MPROTECT"]:
            tracker.mprotect(ev.addr, ev.len, accessible=not ev.flags & c["NATRACE_EVF_NOACCESS"])
        elif kind == c["NATRACE_EV_MREMAP"]:
            tracker.mremap(ev.addr, ev.len, ev.new_addr, ev.new_len)
        elif kind == c["NATRACE_EV_BRK"]:
            owner = Owner(self._syscall_stack(ev), "brk", internal)
            tracker.brk(ev.addr, owner)

    def site_stack(self, stack_id: int) -> tuple[int, ...]:
        """The stack of an allocation site, frame 0 a return address as the symbolizer
        expects. In-process, the capture at the otel_memory:alloc probe starts at the
        probe's own pc (the provider's probe site, e.g. the sampler's fire_alloc), which
        is no return address: it is left out, the provider's callers stay (charged past)."""
        stack = self.stack(stack_id)
        return stack[1:] if self.in_process else stack

    def _syscall_stack(self, ev: Any) -> tuple[int, ...]:
        """The stack of a syscall's event, with the wrapper's caller put back in (the
        frame-pointer walk from inside a libc wrapper skips it), and frame 0 the pc
        after the syscall when a syscall site's probe sat a few instructions on."""
        stack = self.stack(ev.stack_id)
        if stack and ev.flags & self._c["NATRACE_EVF_SITE"]:
            stack = (stack[0] - self._site_pcs.get(stack[0] & 0xFFF, 0), *stack[1:])
        return splice_caller(stack, ev.caller)

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
        for tgid, info in self._iter_allocs():
            if info.ts_ns > cutoff:
                continue
            slot = acc.setdefault((tgid, info.stack_id), [0, 0, 0])
            slot[0] += self._weight_bytes(info)
            slot[1] += self._weight_blocks_fp(info)
            slot[2] += 1
        none = [0, 0, 0]
        return [replace(r, bytes=acc.get((r.pid, r.stack_id), none)[0],
                        blocks=acc.get((r.pid, r.stack_id), none)[1] >> self._shift,
                        samples=acc.get((r.pid, r.stack_id), none)[2] if self.in_process
                        else 0)
                for r in self.sites()]

    def _iter_allocs(self) -> Iterator[tuple[int, Any]]:
        """(tgid, block) of every outstanding block: the table's, then the spilled."""
        for m, off, at in self._buckets():
            for i in at:
                word = _KEY.unpack_from(m, off + 8 * i)[0]
                info = _Block._make(_INFO.unpack_from(m, off + _INFO_AT + _INFO.size * i))
                if word > _SLOT_BUSY and _KEY.unpack_from(m, off + 8 * i)[0] == word:
                    yield self._slot_tgid(word), info  # not emptied or reclaimed meanwhile
        for key, info in map_items(self._bpf["allocs"]):
            yield key.tgid, info

    def _buckets(self) -> Iterator[tuple[mmap.mmap, int, list[int]]]:
        """The table (bpf/alloc.bpf.c's `blocks`) mapped a chunk of buckets at a time and
        unmapped (natrace's RSS grows by one chunk, not the table): for each bucket with
        blocks, the chunk (writable), the bucket's offset in it and its taken slots."""
        table = self._bpf["blocks"]
        size = ctypes.sizeof(table.Leaf)
        count = len(table)
        aligned = math.lcm(size, mmap.PAGESIZE) // size  # buckets to a page-aligned offset
        per_chunk = max(1, _CHUNK // (size * aligned)) * aligned
        bucket = struct.Struct(f"={_BUCKET_SLOTS}Q{size - 8 * _BUCKET_SLOTS}x")
        for first in range(0, count, per_chunk):
            n = min(per_chunk, count - first)
            with mmap.mmap(table.map_fd, n * size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=first * size) as m:
                for b, keys in enumerate(bucket.iter_unpack(m)):
                    at = [i for i, w in enumerate(keys) if w > _SLOT_BUSY]
                    if at:
                        yield m, b * size, at

    def _slot_tgid(self, word: int) -> int:
        return (word >> _TGID_SHIFT) & _TGID_MASK

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
        calls = {name: total(m) - self._set_aside_calls.get(name, 0)
                 for name, m in _CALL_COUNTERS.items()}
        if self.in_process:
            del calls["sampled_out"]
            sampler = self.sampler_counters()
            if sampler is not None:
                loss["sampler_dropped"] = sampler.dropped
                calls["sampler_fired"] = sampler.sampled
        return loss, calls



_HEADER = bpfprog.constants()
_BUCKET_SLOTS = _HEADER["NATRACE_BUCKET_SLOTS"]
_SLOT_BUSY = _HEADER["NATRACE_SLOT_BUSY"]
_TGID_SHIFT = _HEADER["NATRACE_SLOT_TGID_SHIFT"]
_TGID_MASK = (1 << _HEADER["NATRACE_SLOT_TGID_BITS"]) - 1
_KEY = struct.Struct("=Q")
_INFO = struct.Struct("=QQiIQ")  # natrace.h's struct alloc_info
_INFO_AT = 8 * _BUCKET_SLOTS  # its offset in a bucket, after the keys
_CHUNK = 4 << 20  # bytes of the table mapped at a time, a multiple of the page size


class _Block(NamedTuple):
    """An outstanding block as the table holds it (natrace.h's alloc_info)."""

    size: int
    ts_ns: int
    stack_id: int
    pad: int
    weight: int


def entry_probe_offset(ep: EntryPoint) -> int:
    """Where in `ep` its entry uprobe goes: past free's NULL test when that reaches an
    emulated instruction; 0 for every other function (a uretprobe, or a wrapper's
    entry probe, reads the return address on top of the stack). Public so the
    benchmark's empty-probe floor sits exactly where natrace's probes do."""
    if not ep.null_first_arg_ignored:
        return 0
    return probe_offset(ep.path, ep.file_offset, ep.size)


def stack_error_name(stack_id: int) -> str:
    return errno.errorcode.get(-stack_id, str(-stack_id))
