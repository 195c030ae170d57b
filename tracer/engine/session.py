"""One tracing session: a target, its probes, and the loop that keeps them drained.

The engine under every tracing command (run, snapshot, top, record, guard): attach or
launch, poll until a deadline, a signal, the target's exit or exec, then turn what the
probes hold into a model Snapshot. Probes are always detached, whatever happens.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

from tracer.engine.aggregator import Aggregator
from tracer.engine.callsites import CallSites
from tracer.engine.handles import handle_types
from tracer.engine.triage import TriageBuilder
from tracer.errors import AttachInterrupted
from tracer.memory.memwatch import MemoryWatch
from tracer.model.growth import GrowthTracker
from tracer.model.mappings import Owner
from tracer.model.sites import Site
from tracer.model.snapshot import Process, Snapshot
from tracer.model.unwinding import Unwinding
from tracer.probes import bpfprog
from tracer.probes import target as targets
from tracer.probes.alloc import AllocOptions, AllocProbes, RawSite
from tracer.probes.base import ProbeSet
from tracer.probes.handles import HandleOptions, HandleProbes
from tracer.probes.target import Target, is_static_executable
from tracer.probes.triage import TriageOptions, TriageProbes
from tracer.symbols.attribution import DEFAULT_ALLOCATOR_MODULES, first_frame_outside
from tracer.symbols.procmaps import MapsHistory
from tracer.symbols.symbolizer import Symbolizer, jit_note
from tracer.units import format_size

POLL_SECONDS = 0.05
GROWTH_SECONDS = 1.0  # how often each call site's bytes are sampled for leak suspects
# Production mode (the process samples itself, hours at a time): natrace stays nearly idle.
# Its probes fire a few times a second and its ring buffer holds seconds of mapping
# events, so it polls rarely and samples growth and memory at a small share of a CPU.
PRODUCTION_POLL_SECONDS = 0.5
PRODUCTION_GROWTH_SECONDS = 5.0


@dataclass
class SessionOptions:
    alloc: AllocOptions = field(default_factory=AllocOptions)
    allocs: bool = True  # False: triage mode, no malloc-family probes
    # futex, memory-syscall and page-fault tracepoints; None: on, except in production
    # mode (a process sampling itself), where only --triage (True) adds them
    triage: bool | None = None
    triage_probes: TriageOptions = field(default_factory=TriageOptions)
    handles: HandleOptions = field(default_factory=HandleOptions)  # create/destroy pairs
    lock_share: float = 0.05  # a lock is contended above this share of traced time blocked
    lock_p99: float = 0.010  # ... or when its p99 wait is above this many seconds
    charge_to: str = "first"
    unwind: str = "auto"  # tracer/probes/unwinding.py's UNWIND_MODES
    min_age: float = 0.0
    memory_interval: float = 1.0  # seconds between RSS/VMS samples
    # trace the processes the target forks (and theirs), each apart; None: when natrace
    # launched the command (services start through sh -c, npm start, timeout)
    children: bool | None = None
    follow_exec: bool = True  # an attached target's exec: follow it (False: the report ends)


@dataclass
class Child:
    """A process the target (or one of its children) forked, traced in its own address
    space: its maps, symbolizer, allocator and exec chain (the target's are the
    session's own fields)."""

    target: Target
    maps: MapsHistory | None = None
    followed: list[str] = field(default_factory=list)
    exited: bool = False  # stopped in _Exit (its report is of that moment) or gone
    allocator_modules: frozenset[str] = DEFAULT_ALLOCATOR_MODULES
    # once it is gone, its sites as first symbolized: its maps and symbolizer are dropped
    # (a forking server's thousands of short children), its figures no longer change
    sites: list[Site] | None = None


class Session:
    def __init__(self, target: Target, options: SessionOptions) -> None:
        self.target = target
        self.options = options
        self.probes = AllocProbes(options.alloc, options.unwind)
        self.triage = (TriageProbes(options.triage_probes, options.unwind)
                       if options.triage is not False else None)
        self.handles = HandleProbes(options.handles, options.unwind)
        self._call_sites: dict[int, CallSites] = {}  # per process, see _call_sites_for
        self._share_unwind_table()
        if self.triage is not None and options.allocs:
            self.triage.syscalls_via = self.probes  # one raw_syscalls program per direction
        self.production = False  # the process samples itself: see start()
        self._poll_seconds = POLL_SECONDS
        self._growth_seconds = GROWTH_SECONDS
        self.maps: MapsHistory | None = None
        self.started = 0.0
        self.stop_requested: str | None = None
        self.exiting = False  # a launched target is held stopped inside _Exit
        self.execd = False  # the target exec'd another program: stop reading its maps
        self.notes: list[str] = list(target.notes)  # what a report must say about the session
        self.followed: list[str] = []  # commands the target exec'd on from (wrappers)
        # bytes per (process, stack id) over time
        self.growth: GrowthTracker[tuple[int, int]] = GrowthTracker()
        self._next_growth = 0.0
        self.peak_bytes = 0  # the most bytes traced blocks held at a growth sample
        self.memory = MemoryWatch(target.pid, options.memory_interval)
        self._signals: dict[int, Any] = {}  # handlers to restore at close()
        self.attaching = False  # start() is placing probes: a stop signal interrupts it
        self._allocator_modules: frozenset[str] = DEFAULT_ALLOCATOR_MODULES
        self._expected_execs = 1 if target.launched else 0  # a launched target's gate exec
        self.children: dict[int, Child] = {}  # followed children by pid
        self.follow_children = options.allocs and (
            target.launched if options.children is None else options.children)
        self._untraced: dict[int, str] = {}  # children that could not be traced: why
        # raw_syscalls only where something needs them: triage's programs are chained to
        # them, and a followed child stops itself at its fork's return (sys_exit); triage
        # by default is left out in production mode
        asked = options.triage is True or self.follow_children
        self.probes.raw_syscalls = True if asked else (None if self.triage is not None else False)

    def start(self) -> None:
        """Probes in place, then (for a launched command) let it run. bcc's own
        complaints are kept off the terminal: each failure becomes one NatraceError.
        A stop signal meanwhile (compiles and attaches take seconds) ends the attach
        in AttachInterrupted at the next step, and close() removes whatever was
        placed: its handler kills the compiles (the long waits), and whatever error
        their end causes becomes AttachInterrupted too."""
        self._signals = _catch_stop_signals(self)
        self.attaching = True
        try:
            self._place_probes()
        except Exception:
            if self.stop_requested is None:
                raise
        finally:
            self.attaching = False
        self._stop_if_asked()
        self._allocator_modules = _allocator_modules(self.target)
        if self.options.follow_exec and not self.target.launched:
            for probes in self._probe_sets():
                probes.follow(self.target.pid)
        if self.follow_children:
            self.probes.follow_children()
        self.started = time.monotonic()
        if not self.target.launched:
            self.maps = MapsHistory(self.target.pid)
        self.target.release()

    def _place_probes(self) -> None:
        """Every probe set compiled (side by side) and attached; a launched command
        still waits at its gate."""
        with bpfprog.captured_stderr():
            used = [p for p in self._probe_sets() if p is not self.probes or self.options.allocs]
            for probes in used:  # cold compiles side by side
                probes.prepare(self.target)
            for probes in used:  # cached programs verified side by side (owner first)
                self._stop_if_asked()
                probes.preload(self.target)
            if self.options.allocs:
                self._stop_if_asked()
                self.probes.attach(self.target)
                if self.probes.in_process:
                    self._production()
            if self.triage is not None:
                self._stop_if_asked()
                self.triage.attach(self.target, stop_at_exit=not self.options.allocs)
            self._stop_if_asked()
            self.handles.attach(self.target, stop_at_exit=not self.options.allocs and
                                self.triage is None)

    def _stop_if_asked(self) -> None:
        """A step of the attach ends here when a stop signal came during the last one."""
        if self.stop_requested is not None:
            raise AttachInterrupted(self.stop_requested,
                                    signal.Signals[self.stop_requested].value)

    def _share_unwind_table(self) -> None:
        owner = self.probes if self.options.allocs else self.triage  # attached first
        for later in (self.triage, self.handles):
            if later is not None and later is not owner:
                later.unwind_owner = owner  # one unwind table for the session

    def _production(self) -> None:
        """The process samples itself: the tracer must cost ~nothing for hours. Only
        what was asked for explicitly joins the sampled allocations; natrace polls
        rarely and reads memory, regions and books at a small share of a CPU."""
        self.production = True
        left_out = []
        if self.options.triage is None and self.triage is not None:
            self.triage.detach()  # preloaded only
            self.triage = None
            left_out.append(("triage tracepoints", "--triage"))
        if self.options.handles.presets is None:
            self.handles.detach()
            self.handles = HandleProbes(replace(self.options.handles, presets=False),
                                        self.options.unwind)
            self._share_unwind_table()
            left_out.append(("the built-in handle pairs", "--handles"))
        if left_out:
            what = " and ".join(w for w, _ in left_out)
            flags = ", ".join(f for _, f in left_out)
            self.notes.append(f"production mode (the process samples itself): {what} left "
                              f"out ({flags} add{'s' if len(left_out) == 1 else ''} them)")
        self._poll_seconds = PRODUCTION_POLL_SECONDS
        self._growth_seconds = PRODUCTION_GROWTH_SECONDS
        self.memory.production()

    def run(self, duration: float | None, interval: float | None = None,
            on_interval: Callable[[Session], None] | None = None) -> None:
        """Poll until `duration` passes, a signal arrives, or the target exits;
        call `on_interval` every `interval` seconds meanwhile (recordings, live views)."""
        deadline = None if duration is None else self.started + duration
        next_tick = None if interval is None else self.started + interval
        with _naps(self.probes.wakeup_fd() if self.options.allocs else None) as nap:
            while self.stop_requested is None:
                if not self.poll():
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if next_tick is not None and interval is not None and now >= next_tick:
                    next_tick = now + interval
                    if on_interval is not None:
                        on_interval(self)
                nap(self._poll_seconds)
        self._poll()

    def poll(self) -> bool:
        """One step of `run`'s loop, for callers that keep their own clock (live views):
        drain the probes; False once the target has exited, stopped in _Exit or
        exec'd another program."""
        if self._target_execd():
            return False
        self._poll()
        return not self._target_stopped_at_exit() and self.target.alive()

    @property
    def probe_count(self) -> int:
        """Uprobes and tracepoints attached."""
        return (len(self.probes.points) + (len(self.triage.points) if self.triage else 0)
                + len(self.handles.points))

    def _poll(self) -> None:
        self.probes.poll()
        if self.follow_children:
            self._tend_children()
        self._observe_growth()
        if self._past_gate():
            self.memory.tick()
        self.handles.poll()
        changed = self.probes.modules_changed
        if self.triage is not None:
            self.triage.poll()
            changed |= self.triage.modules_changed
            self.triage.modules_changed = False
        if changed or self.maps is None:
            self.probes.modules_changed = False
            self._reread_maps(changed)
            if changed and self._past_gate():
                self.handles.refresh(self.target)

    def _reread_maps(self, code_mapped: bool) -> None:
        """The maps read again; when the target mapped code and exited before natrace
        could read them (an attached process is not held at its exit), the last maps
        read are kept and the report says why frames in that code are missing."""
        self._refresh_maps()
        if code_mapped and self.maps is not None and self.maps.gone:
            self._note_maps_missed()

    def _note_maps_missed(self) -> None:
        note = (f"process {self.target.pid} exited before natrace could read its memory map "
                "again: frames in code it mapped last (e.g. a library dlopen'ed just before "
                "exiting) could not be named, and their bytes are charged to their nearest "
                "caller natrace could name")
        if note not in self.notes:
            self.notes.append(note)

    def _observe_growth(self) -> None:
        """Each call site's bytes once a second (raw, per stack id: no symbolizing
        in the loop), so every report can tell a steady leak from a big but flat site."""
        now = time.monotonic()
        if not self.options.allocs or now < self._next_growth:
            return
        self._next_growth = now + self._growth_seconds
        raw = self.probes.sites()
        self.growth.observe(now, {(r.pid, r.stack_id): r.bytes for r in raw})
        self.peak_bytes = max(self.peak_bytes, sum(r.bytes for r in raw))

    def _refresh_maps(self) -> None:
        if self.execd:
            return  # the new program's maps would shadow the old one's addresses
        if not self._past_gate():
            return  # natrace's own gate (a python3 at 0x400000) would shadow the command
        if self.maps is None:
            try:
                self.maps = MapsHistory(self.target.pid)
            except OSError:
                return
        else:
            self.maps.refresh()
        for pid, child in self.children.items():
            if child.maps is not None and not child.exited:
                child.maps.refresh()
                self._child_rows(pid, child)
        for probes in self._probe_sets():
            probes.update_unwind(self.maps)

    def _child_rows(self, pid: int, child: Child) -> None:
        """A child's unwind table brought up to its maps just read; freed once it is
        gone."""
        if child.maps is None or child.maps.gone:
            self.probes.forget_unwind(pid)
        else:
            self.probes.update_unwind(child.maps)

    def _probe_sets(self) -> list[ProbeSet]:
        return [p for p in (self.probes, self.triage, self.handles) if p is not None]

    def _target_stopped_at_exit(self) -> bool:
        """A launched target stops itself in _Exit: read its maps while they exist.
        It also stops when it maps code, for its unwind rows: load them and resume it."""
        if not self.target.stopped():
            return False
        if self._execs() > self._expected_execs:
            self._follow_exec()
            return False
        if any([p.take_code_stop() for p in self._probe_sets()]):
            self._refresh_maps()
            os.kill(self.target.pid, signal.SIGCONT)
            return False
        self.exiting = True
        self._refresh_maps()
        self.probes.poll()
        self.probes.read_exiting(self.target.pid)
        return True

    def _tend_children(self) -> None:
        """Children stop themselves for natrace (bpf/alloc.bpf.c, target.bpf.h): at
        birth (probe them), at exec (follow them into the new program), at each code
        mapping (its unwind rows) and in _Exit (read their maps while they exist). Do
        what each stop is for, then resume it."""
        c = bpfprog.constants()
        for pid, proc in self.probes.procs().items():
            if pid == self.target.pid or not proc.stop:
                continue
            child = self.children.get(pid)
            if child is None:
                child = self.children[pid] = Child(targets.child(pid, proc.parent))
            if not child.target.stopped_now():
                if not child.target.alive():  # killed before natrace saw the stop
                    child.exited = True
                    self.probes.clear_stop(pid)
                    self.probes.forget_unwind(pid)
                continue
            try:
                with bpfprog.captured_stderr():
                    if proc.stop == c["NATRACE_STOP_FORK"]:
                        child.maps = MapsHistory(pid)
                        child.allocator_modules = _allocator_modules(child.target)
                        self.probes.add_process(child.target)
                        self._child_rows(pid, child)
                    elif proc.stop == c["NATRACE_STOP_EXEC"]:
                        child.followed.append(" ".join(child.target.argv))
                        child.target.follow_exec()
                        child.maps = MapsHistory(pid)
                        child.allocator_modules = _allocator_modules(child.target)
                        self._child_rows(pid, child)
                        self.probes.follow_exec(child.target)
                    elif proc.stop == c["NATRACE_STOP_CODE"]:  # rows before it runs the code
                        if child.maps is None:
                            child.maps = MapsHistory(pid)
                        else:
                            child.maps.refresh()
                        self._child_rows(pid, child)
                        self.probes.clear_stop(pid)
                    else:  # in _Exit: the last moment its address space exists
                        if child.maps is not None:
                            child.maps.refresh()
                        self.probes.read_exiting(pid)
                        child.exited = True
                        self.probes.clear_stop(pid)
                        self.probes.forget_unwind(pid)
            except Exception as err:  # gone meanwhile, or a file could not be probed
                self._untraced[pid] = f"{' '.join(child.target.argv)}: {err}"
                self.probes.clear_stop(pid)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def _children_note(self) -> list[str]:
        """Every child process the target forked, alive or exited, that is not traced."""
        forked = self.probes.forks()
        traced = set(self.children) - set(self._untraced)
        kids = {pid: " ".join(targets.command_of(pid)) or forked.get(pid, ("?", False, False))[0]
                for pid in self.target.children() if pid not in traced}
        kids.update({pid: f"{comm}, exited" for pid, (comm, exited, _t) in forked.items()
                     if exited and pid not in traced})
        kids.update({pid: f"could not be traced: {why}" for pid, why in self._untraced.items()})
        if not kids:
            return []
        shown = ", ".join(f"{pid} ({what})" for pid, what in sorted(kids.items())[:8])
        more = ", ..." if len(kids) > 8 else ""
        why = ("" if self.follow_children else
               " (natrace follows one process, through exec; --children traces them)")
        return [f"{len(kids)} child process(es) of {self.target.pid} are not "
                f"traced{why}: {shown}{more}"]

    def _reserved_note(self) -> list[str]:
        """The program's PROT_NONE address space, left out of unfreed (model/mappings.py):
        V8's cage and code range alone reserve hundreds of MiB that hold nothing."""
        if not self.options.allocs:
            return []
        size = count = 0
        for proc, _maps, _allocator in self._processes():
            n, ranges = self.probes.mappings(proc.pid).reserved()
            size, count = size + n, count + ranges
        if not size:
            return []
        return [f"address space reserved PROT_NONE while traced: {format_size(size)} in "
                f"{count} ranges, not counted as unfreed (until mprotect makes it accessible)"]

    def _stopped_note(self) -> list[str]:
        """An attached process stopped by someone else (a launched one stops in exit()
        for natrace's own sake)."""
        note = None if self.target.launched else targets.stopped_note(self.target.pid)
        return [note] if note else []

    def _execs(self) -> int:
        """exec()s of the target since the probes were attached (any probe set)."""
        pid = self.target.pid
        return max(p.execs(pid) for p in self._probe_sets())

    def _past_gate(self) -> bool:
        """Is the process the command now? Until a launched target has exec'd, its
        memory and maps are those of natrace's own pre-exec gate."""
        return not self.target.launched or self._execs() >= 1

    def _target_execd(self) -> bool:
        """The target exec'd another program: what natrace holds is the old one's."""
        if self._execs() > self._expected_execs and not self.execd:
            if self.target.launched and self.target.wait_stopped():
                self._follow_exec()
                return False
            if self.options.follow_exec and not self.target.launched and self._wait_stop():
                self._follow_exec()
                return False
            self.execd = True
            self.notes.append(f"process {self.target.pid} exec'd another program: this "
                              "report covers the program it ran before; run natrace again "
                              "to trace the new one")
        return self.execd

    def _wait_stop(self) -> bool:
        """An attached target stops itself at exec (it is followed): wait for the stop
        to take effect; False if it exited instead."""
        for _ in range(500):
            if self.target.stopped_now():
                return True
            if not self.target.alive():
                return False
            time.sleep(0.01)
        return False

    def _followed_note(self) -> list[str]:
        """One note per exec chain: a shell loop runs the same command in a new child
        each time, and a note per child buried the report under copies of one line."""
        chains: dict[tuple[str, ...], list[int]] = {}
        for pid, followed, argv in [(self.target.pid, self.followed, self.target.argv)] + [
                (pid, c.followed, c.target.argv) for pid, c in sorted(self.children.items())]:
            if followed:
                chains.setdefault((*followed, " ".join(argv)), []).append(pid)
        notes = []
        for chain, pids in chains.items():
            text = " -> ".join(f"'{c}'" for c in chain)
            if len(pids) == 1:
                notes.append(f"followed process {pids[0]} through exec: {text}; its report "
                             "is of the last program")
            else:
                shown = ", ".join(str(p) for p in pids[:8]) + (", ..." if len(pids) > 8 else "")
                notes.append(f"followed {len(pids)} processes through exec: {text} (PIDs "
                             f"{shown}); each one's report is of the last program")
        return notes

    def _follow_exec(self) -> None:
        """A launched command exec'd the program it wraps (env, nice, timeout's exec, a
        script's exec): it stopped itself at the exec (bpf/target.bpf.h). The report is
        of the program the command ends up running: start afresh on it, then resume."""
        old = " ".join(self.target.argv)
        self.target.follow_exec()
        self._allocator_modules = _allocator_modules(self.target)
        self._expected_execs = self._execs()
        self.maps = None
        self._refresh_maps()
        self.growth = GrowthTracker()
        with bpfprog.captured_stderr():
            for probes in (self.probes, self.triage, self.handles):
                if probes is not None:
                    probes.follow_exec(self.target)
        self.followed.append(old)
        os.kill(self.target.pid, signal.SIGCONT)

    def _call_sites_for(self, pid: int, maps: MapsHistory | None) -> CallSites:
        """One symbolizer and call-site memo per address space, kept across snapshots:
        top and the agent take one every second or so, and re-symbolizing every address
        of every (CFI-deep) stack each time cost more than a CPU."""
        maps = maps or MapsHistory.from_lines([], pid=pid)
        have = self._call_sites.get(pid)
        if have is None or have.symbolizer.maps is not maps:
            have = self._call_sites[pid] = CallSites(Symbolizer(maps, pid, lines=True))
        return have

    def _processes(self) -> list[tuple[Process, MapsHistory | None, frozenset[str]]]:
        """Every traced process (the target first): its model entry, maps, allocator."""
        root = Process(self.target.pid, " ".join(self.target.argv), 0,
                       self.exiting or not self.target.alive(), list(self.followed))
        out = [(root, self.maps, self._allocator_modules)]
        for pid, c in sorted(self.children.items()):
            if pid in self._untraced or (c.maps is None and c.sites is None):
                continue
            out.append((Process(pid, " ".join(c.target.argv), c.target.parent,
                                c.exited or not c.target.alive(), list(c.followed)),
                        c.maps, c.allocator_modules))
        return out

    def _sites(self, raw: list[RawSite]) -> list[Site]:
        """Each process's sites, symbolized in its own address space and charged by its
        own allocator, with its growth; all of them together, most bytes first."""
        out: list[Site] = []
        by_pid: dict[int, list[RawSite]] = {}  # one pass: a forking server has hundreds
        for r in raw:
            by_pid.setdefault(r.pid, []).append(r)
        for proc, maps, allocator in self._processes():
            child = self.children.get(proc.pid) if proc.pid != self.target.pid else None
            if child is not None and child.sites is not None:
                sites = child.sites
            else:
                sites = self._symbolized_sites(proc.pid, maps, allocator,
                                               by_pid.get(proc.pid, []))
                if child is not None and self._gone_for_good(child):
                    child.sites, child.maps = sites, None
                    self._call_sites.pop(proc.pid, None)
            for site in sites:
                if site.stack_ids:
                    f = self.growth.combined_fit((proc.pid, i) for i in site.stack_ids)
                    site.per_minute = f.per_minute if f.samples >= 2 else None
                    site.suspect = self.growth.policy.is_suspect(f)
            out += sites
        return sorted(out, key=lambda s: (-s.bytes, -s.blocks, -s.alloc_bytes, s.label(),
                                          s.pid))

    def _symbolized_sites(self, pid: int, maps: MapsHistory | None,
                          allocator: frozenset[str], raw: list[RawSite]) -> list[Site]:
        aggregator = Aggregator(self._call_sites_for(pid, maps), self.options.charge_to,
                                allocator)
        mappings = (list(self.probes.mappings(pid).totals())
                    if self.options.allocs and self.options.min_age <= 0 else [])
        sites = aggregator.sites(raw, self.probes.site_stack, mappings,
                                 origin_ns=int(self.started * 1e9))
        for site in sites:
            site.pid = pid
        return sites

    def _gone_for_good(self, child: Child) -> bool:
        """A child whose figures can no longer change: it exited and is gone (with
        --min-age the set of old-enough blocks still moves on with the clock)."""
        return child.exited and self.options.min_age <= 0 and not child.target.alive()

    def snapshot(self) -> Snapshot:
        if not self.target.alive():  # the last mapping events may have come after the last poll
            self.probes.poll()
        changed = self.probes.modules_changed
        self._reread_maps(changed)
        call_sites = self._call_sites_for(self.target.pid, self.maps)
        if not self.options.allocs:
            raw = []
        elif self.options.min_age > 0:
            raw = self.probes.sites_older_than(self.options.min_age)
        else:
            raw = self.probes.sites()
        loss, calls = self.probes.counters() if self.options.allocs else ({}, {})
        sites = self._sites(raw)
        own = [s for s in sites if s.pid == self.target.pid]  # the memory watch's process
        duration = time.monotonic() - self.started
        return Snapshot(
            pid=self.target.pid,
            command=" ".join(self.target.argv),
            taken_at=time.time(),
            duration=duration,
            allocs=self.options.allocs,
            sample_bytes=(self.probes.period if self.probes.in_process
                          else self.options.alloc.sample_bytes),
            in_process=self.probes.in_process,
            min_age=self.options.min_age,
            sites=sites,
            loss=loss,
            calls=calls,
            peak_bytes=max(self.peak_bytes, sum(r.bytes for r in raw)) if self.options.allocs
            else None,
            target_exited=self.exiting or not self.target.alive(),
            exit_code=self.target.exit_code,
            memory=self.memory.report(own, traced=self.options.allocs,
                                      from_start=self.target.launched,
                                      v8_ranges=self._v8_ranges(call_sites),
                                      command=shlex.join(self.target.argv)),
            **self._triage_report(call_sites, duration),
            handles=handle_types(self.handles, call_sites),
            notes=self.notes + self.probes.notes + self._followed_note() + self._children_note()
            + self._stopped_note() + self._reserved_note()
            + jit_note(call_sites.symbolizer, len(call_sites.unnamed_jit)),
            unwinding=self._unwinding(),
            processes=[proc for proc, _m, _a in self._processes()],
        )

    def _unwinding(self) -> Unwinding:
        """Which objects each probe set walked how, and its walks' ends, summed."""
        out = Unwinding(self.options.unwind)
        for probes in self._probe_sets():
            objects, ends, (cached, stale) = probes.unwind_report()
            out.objects.update(objects)
            out.cached += cached
            out.cache_stale += stale
            for reason, n in ends.items():
                out.ended[reason] = out.ended.get(reason, 0) + n
        return out

    def _v8_ranges(self, call_sites: CallSites) -> list[tuple[int, int]] | None:
        """Live mappings node's own code made (V8's page allocator: its heap and JIT
        code), from the traced mmap call sites; None when mappings were not traced."""
        if not self.options.allocs or not self.memory.node:
            return None
        v8: dict[Owner, bool] = {}
        out = []
        for start, end, owner in self.probes.mappings(self.target.pid).ranges():
            if owner.kind != "mmap" or owner.allocator_internal:
                continue
            if owner not in v8:
                frames, i = call_sites.charged(owner.stack,
                                               lambda f: first_frame_outside(f, ("libc",)))
                v8[owner] = bool(frames) and frames[i].module_class == "node"
            if v8[owner]:
                out.append((start, end))
        return out

    def _triage_report(self, call_sites: CallSites, duration: float) -> dict[str, Any]:
        """The Snapshot fields of the triage probes: locks, syscalls, faults."""
        if self.triage is None:
            return {}
        builder = TriageBuilder(self.triage, call_sites)
        return {
            "locks": builder.locks(self.triage.futexes(), duration, self.options.lock_share,
                                   int(self.options.lock_p99 * 1e9)),
            "syscalls": builder.syscalls(self.triage.memsys(), self.triage.memsys_errors(),
                                         duration),
            "faults": builder.faults(self.triage.faults(), self.triage.counters()["faults"]),
            "triage_loss": {k: v for k, v in self.triage.counters().items() if k != "faults"},
        }

    def close(self) -> None:
        """Detach every probe; let a launched target that stopped in _Exit finish. The
        stop signals' handlers go back only on the main thread (Python allows no other):
        top's driver thread closes the session the moment the target ends, and the
        command's own close() on the main thread restores them after."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._signals.items():
                signal.signal(signum, handler)
            self._signals = {}
        self.probes.detach()
        if self.triage is not None:
            self.triage.detach()
        self.handles.detach()
        if self.target.launched and self.target.exit_code is None:
            with suppress(ProcessLookupError):
                os.kill(self.target.pid, signal.SIGCONT)
        for pid, child in self.children.items():  # one may be stopped for natrace
            if child.target.stopped_now():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def _allocator_modules(target: Target) -> frozenset[str]:
    """Whose malloc-family frames are the allocator's: a static executable's own too
    (its libc and libstdc++ — malloc, strdup, operator new — are inside it)."""
    exe = target.executable()
    if exe is not None and is_static_executable(exe):
        return DEFAULT_ALLOCATOR_MODULES | {os.path.basename(exe)}
    return DEFAULT_ALLOCATOR_MODULES


@contextmanager
def _naps(stops: int | None = None) -> Iterator[Callable[[float], None]]:
    """A sleep between polls that ends early when a signal comes: SIGCHLD (a launched
    target, natrace's child, stopping for natrace at a code mapping or in _Exit, or
    exiting) or a stop signal. `natrace run -- true` waited up to a poll interval for
    each of its two or three stops (~0.1 s of its wall clock). Python's wakeup fd
    carries the signals (main thread only; elsewhere, or when someone else uses it,
    none); SIGCHLD restarts interrupted system calls, and the threads that load BPF
    programs block it (bpfimage: the verifier gives up on a pending signal). Any other
    traced process stopping for natrace (a child at birth, exec and _Exit) wakes
    `stops`, watched edge-triggered (the allocation probes' ring buffer, which mapping
    events never wake): in production mode (polls 0.5 s apart) each child of a `sh -c`
    loop waited that long at each of its stops."""
    with select.epoll() as ep:
        if stops is not None:
            ep.register(stops, select.EPOLLIN | select.EPOLLET)

        def sleep(seconds: float) -> None:
            ep.poll(seconds)

        if threading.current_thread() is not threading.main_thread():
            yield sleep
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        if previous != -1:  # someone else's (an event loop): leave it theirs
            signal.set_wakeup_fd(previous)
            os.close(r)
            os.close(w)
            yield sleep
            return
        ep.register(r, select.EPOLLIN)
        chld = signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.siginterrupt(signal.SIGCHLD, False)

        def nap(seconds: float) -> None:
            sleep(seconds)
            with suppress(BlockingIOError):
                while os.read(r, 512):
                    pass

        try:
            yield nap
        finally:
            signal.signal(signal.SIGCHLD, chld)
            signal.set_wakeup_fd(-1)
            os.close(r)
            os.close(w)


def _catch_stop_signals(session: Session) -> dict[int, Any]:
    """From the first probe placed until close(), SIGINT/SIGTERM/SIGHUP end the session
    cleanly instead of killing natrace mid-way: while attaching, at the next step of
    start(), the compile children killed at once (the waits that take seconds); once
    traced, by ending the poll loop (report written, probes detached). The handler
    raises nothing: an exception raised from it lands in whatever code runs, and
    libraries break on it (pyelftools reported it as a malformed ELF file, capstone's
    half-built disassembler complained on stderr, subprocess left a started child
    unkilled). Returns the handlers to restore (none off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        session.stop_requested = signal.Signals(signum).name
        if session.attaching:
            bpfprog.stop_compiles()

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM,
                                                   signal.SIGHUP)}
