"""Handle-lifecycle probes: create/destroy function pairs in a library (uprobes).

Owns the BPF program bpf/handles.bpf.c. A pair is a library, the functions that
create a handle (returned, or written through an out-pointer) and the function that
destroys it (the handle as its Nth argument). Built-in presets (libpq's PGresult and
PGconn, Node-API references) are traced whenever the target maps their library;
users add pairs with `--handle LIB:CREATE:DESTROY[:ARG]`. Hands raw per-pair and
per-stack counters, live handles' ages and stacks to tracer/engine/handles.py.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tracer.errors import UsageError
from tracer.model.growth import Series
from tracer.probes import bpfprog
from tracer.probes.base import ProbeSet, map_items
from tracer.probes.target import Target


@dataclass(frozen=True)
class HandlePair:
    """What creates and destroys one kind of handle, in which library.

    `library` is a file name or its stem (libpq, libssl.so.3, node) matched against the
    target's files, or a path (probed even before the target loads it)."""

    name: str  # as reports show it: "libpq PGresult"
    library: str
    create: tuple[str, ...]
    destroy: str
    destroy_arg: int = 1  # 1-based argument of `destroy` holding the handle
    out_arg: int = 0  # 0: create returns the handle; else its 1-based out-pointer argument
    preset: bool = False


PRESETS: tuple[HandlePair, ...] = (
    # PQexec, PQexecParams, PQgetResult, PQprepare, ... all make results through
    # PQmakeEmptyPGresult: they show up as the creation site's "via".
    HandlePair("libpq PGresult", "libpq", ("PQmakeEmptyPGresult",), "PQclear", preset=True),
    HandlePair("libpq PGconn", "libpq",
               ("PQconnectdb", "PQconnectdbParams", "PQconnectStart", "PQconnectStartParams",
                "PQsetdbLogin"), "PQfinish", preset=True),
    # napi_create_reference(env, value, refcount, napi_ref *result) -> napi_status (0: ok)
    HandlePair("node napi_ref", "node", ("napi_create_reference",), "napi_delete_reference",
               destroy_arg=2, out_arg=4, preset=True),
)

GROWTH_WINDOW = 600.0  # seconds of live counts a pair's growth is fitted over

_SYMBOL = re.compile(r"^[A-Za-z_][\w.$@]*$")


def parse_pair(spec: str) -> HandlePair:
    """`LIB:CREATE[,CREATE...]:DESTROY[:ARG]` -> a pair; ValueError with a one-line
    reason. Several create functions may make the same handle, one inside another: it
    is counted once."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise ValueError(f"--handle {spec!r}: expected LIB:CREATE:DESTROY[:ARG], "
                         "e.g. libssl:SSL_new:SSL_free")
    library, destroy = parts[0], parts[2]
    create = tuple(parts[1].split(","))
    for fn in (*create, destroy):
        if not _SYMBOL.match(fn):
            raise ValueError(f"--handle {spec!r}: {fn!r} is not a function name")
    arg = 1
    if len(parts) == 4:
        if not parts[3].isdigit() or not 1 <= int(parts[3]) <= 6:
            raise ValueError(f"--handle {spec!r}: ARG must be the destroy function's "
                             "argument number, 1 to 6")
        arg = int(parts[3])
    stem = os.path.basename(library).split(".so", 1)[0]
    return HandlePair(f"{stem} {create[0]}", library, create, destroy, destroy_arg=arg)


def system_libraries() -> list[str]:
    """Every library the dynamic loader's cache knows (`ldconfig -p`): where a library
    a process has not loaded yet would come from if it dlopen()s it by name."""
    return list(_system_libraries())


@functools.cache
def _system_libraries() -> tuple[str, ...]:
    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True,
                                 timeout=10, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        return tuple(line.rsplit("=> ", 1)[1].strip() for line in out.splitlines()
                     if "=> /" in line)
    return ()


def _same_file(a: str, b: str) -> bool:
    """Uprobes live on inodes: /lib/x and /usr/lib/x are one file, probed once."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def find_library(library: str, files: Sequence[str]) -> str | None:
    """The file of `files` a pair's library names: same basename, or basename starting
    with LIB. or libLIB. (libpq -> libpq.so.5, node -> /usr/bin/node or libnode.so.115).
    A path is taken as is when it exists, mapped or not (uprobes are per file)."""
    if "/" in library:
        return library if os.path.exists(library) else None
    for path in files:
        base = os.path.basename(path)
        if base == library or base.startswith((library + ".", "lib" + library + ".")):
            return path
    return None


@dataclass(frozen=True)
class HandleOptions:
    pairs: tuple[HandlePair, ...] = ()  # user-defined (--handle)
    # trace PRESETS whose library the target maps; None: yes, except in production mode
    # (a process sampling itself: tracer/engine/session.py), where only True does
    presets: bool | None = None
    max_handles: int = 1 << 18
    stack_map_size: int = 1 << 14


@dataclass(frozen=True)
class TracedPair:
    """A pair as attached: its slot in the BPF maps and the file probed."""

    index: int
    pair: HandlePair
    path: str
    ahead: bool = False  # probed from the loader's cache before the target mapped it


@dataclass(frozen=True)
class RawPairStats:
    created: int
    destroyed: int
    unknown: int
    live: int
    stale: int
    untracked: int


@dataclass(frozen=True)
class RawHandleSite:
    """Kernel counters of one (pair, creation stack id); negative id: -errno."""

    pair: int
    stack_id: int
    live: int
    created: int


class HandleProbes(ProbeSet):
    unwind_depth = 64  # one walking program per pair
    stack_chunk = 8  # its uprobes fire far less often than malloc's
    def __init__(self, options: HandleOptions, unwind: str = "fp") -> None:
        super().__init__(unwind)
        self.options = options
        self.pairs: list[TracedPair] = []
        self.points: list[str] = []  # "path:symbol" probed (entry, return or destroy)
        self.series: dict[int, Series] = {}  # pair -> live count over monotonic seconds
        self._c = bpfprog.constants()
        self._last_sample = 0.0
        self._resolved_for: tuple[Target, list[TracedPair]] | None = None

    def resolve(self, target: Target, chosen: Sequence[TracedPair] = ()) -> list[TracedPair]:
        """The pairs to trace in `target`, after those already `chosen`: presets whose
        library it maps or could load by name later (the loader's cache: uprobes are per
        file, so a library dlopen()ed later is probed from its first call), and that
        define the functions; then every user pair (an error when its library or a
        function cannot be found)."""
        files = target.mapped_files()
        exe = target.executable()
        if exe:
            files = [exe, *files]
        late = bool(chosen)  # mapped mid-session: skip what does not fit, never fail
        chosen = list(chosen)
        wanted = self._wanted()
        for pair in wanted:
            path = find_library(pair.library, files)
            ahead = path is None and pair.library != "node"  # node's N-API: its executable
            if ahead:
                path = find_library(pair.library, system_libraries())
            if path is None:
                if pair.preset or late:
                    continue
                raise UsageError(f"--handle {pair.library}:{pair.create[0]}: PID {target.pid} "
                                 f"maps no {pair.library} and the loader knows none (give the "
                                 "library's path to probe it before it is loaded)")
            if any(c.pair.create == pair.create and c.pair.destroy == pair.destroy and
                   _same_file(c.path, path) for c in chosen):
                continue  # traced already (a user pair that repeats a preset, a refresh)
            missing = [fn for fn in (*pair.create, pair.destroy)
                       if not bpfprog.defines_symbol(path, fn)]
            if missing:
                if pair.preset or late:
                    continue
                raise UsageError(f"--handle {pair.library}:{pair.create[0]}: {path} defines "
                                 f"no function {missing[0]}")
            if len(chosen) == self.slots():
                if late:
                    break  # another copy of a library: its pairs have no stubs left
                raise UsageError(f"at most {len(chosen)} handle pairs can be traced at once")
            chosen.append(TracedPair(len(chosen), pair, path, ahead))
        return chosen

    def _wanted(self) -> list[HandlePair]:
        return [*(PRESETS if self.options.presets is not False else ()), *self.options.pairs]

    def slots(self) -> int:
        """How many pairs the compiled program has stubs for: each wanted pair once (a
        second copy of a library mapped later finds none left). Fewer stubs: a cold
        compile of handles.bpf.c takes 0.47 s of CPU instead of 0.74 (3 pairs of 16)."""
        return min(len(self._wanted()), self._c["NATRACE_MAX_PAIRS"])

    def refresh(self, target: Target) -> None:
        """The target mapped new code: trace the pairs of libraries it brought (a copy
        of libpq outside the loader's cache, a user pair's library by name). From the
        moment natrace sees the mapping: handles made before that are not counted."""
        if self._bpf is None:
            return
        try:
            for tp in self.resolve(target, self.pairs)[len(self.pairs):]:
                self._trace(tp, target.pid)
                self.pairs.append(tp)
        except Exception:  # the target went away, or a file could not be probed
            return

    def program(self, target: Target) -> tuple[str, dict[str, int | str]] | None:
        """None when no pair is to be traced; a user pair's error waits for attach()."""
        try:
            pairs = self._resolved(target)
        except UsageError:
            return None
        if not pairs:
            return None
        return "handles.bpf.c", {"PAIR_SLOTS": self.slots(),
                                 "MAX_HANDLES": self.options.max_handles,
                                 "MAX_STACKS": self.options.stack_map_size}

    def _resolved(self, target: Target) -> list[TracedPair]:
        """resolve(target), once per target (prepare() and attach() both ask)."""
        if self._resolved_for is None or self._resolved_for[0] is not target:
            self._resolved_for = (target, self.resolve(target))
        return self._resolved_for[1]

    def attach(self, target: Target, stop_at_exit: bool = False) -> None:
        """Compile and attach when there is any pair to trace; `stop_at_exit` makes a
        launched target stop in _Exit (when no other probe set does)."""
        pairs = self._resolved(target)
        program = self.program(target)
        if program is None:
            return
        self._load(program[0], target, program[1])
        with self._attaching(target, "handle uprobes"):
            for tp in pairs:
                self._trace(tp, target.pid)
            if stop_at_exit:
                self._stop_at_exit(target)
        self._arm(target)
        self.pairs = pairs

    def follow_exec(self, target: Target) -> None:
        """The launched command exec'd the program it wraps: its libraries' pairs too."""
        self.refresh(target)
        super().follow_exec(target)

    def _trace(self, tp: TracedPair, pid: int) -> None:
        """Configure the pair's slot, attach its probes, start its live-count series."""
        conf = self._bpf["conf"]
        conf[ctypes.c_int(tp.index)] = conf.Leaf(tp.pair.destroy_arg, tp.pair.out_arg)
        self._attach_pair(tp, pid)
        self.series[tp.index] = Series(GROWTH_WINDOW)
        self.series[tp.index].add(time.monotonic(), 0)

    def _attach_pair(self, tp: TracedPair, pid: int) -> None:
        n = tp.index
        for fn in tp.pair.create:
            self._bpf.attach_uprobe(name=tp.path, sym=fn, fn_name=f"create_enter_{n}", pid=pid)
            self._bpf.attach_uretprobe(name=tp.path, sym=fn, fn_name=f"create_return_{n}",
                                       pid=pid)
            self.points.append(f"{tp.path}:{fn}")
        self._bpf.attach_uprobe(name=tp.path, sym=tp.pair.destroy, fn_name=f"destroy_{n}",
                                pid=pid)
        self.points.append(f"{tp.path}:{tp.pair.destroy}")

    def poll(self, every: float = 1.0) -> None:
        """Sample each pair's live count (at most once per `every` s) for its growth."""
        now = time.monotonic()
        if self._bpf is None or now - self._last_sample < every:
            return
        self._last_sample = now
        for index, stats in self.pair_stats().items():
            self.series[index].add(now, stats.live)

    def pair_stats(self) -> dict[int, RawPairStats]:
        table = self._bpf["pair_stats"]
        out = {}
        for tp in self.pairs:
            v = table[ctypes.c_int(tp.index)]
            out[tp.index] = RawPairStats(v.created, v.destroyed, v.unknown, v.live, v.stale,
                                         v.untracked)
        return out

    def sites(self) -> list[RawHandleSite]:
        return [RawHandleSite(k.pair, k.stack_id, v.live, v.created)
                for k, v in self._bpf["sites"].items() if v.live or v.created]

    def oldest(self) -> dict[tuple[int, int], int]:
        """(pair, stack id) -> creation time (monotonic ns) of its oldest live handle."""
        out: dict[tuple[int, int], int] = {}
        for key, info in self._iter_handles():
            k = (key.pair, info.stack_id)
            if k not in out or info.ts_ns < out[k]:
                out[k] = info.ts_ns
        return out

    def _iter_handles(self) -> Iterator[tuple[Any, Any]]:
        return map_items(self._bpf["handles"])

    @property
    def attached(self) -> bool:
        return self._bpf is not None

