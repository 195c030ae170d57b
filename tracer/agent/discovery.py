"""Which processes the agent watches: given PIDs, command lines matching a pattern,
members of a cgroup. Rescanned every interval, so a service that restarts is picked
up again and one that ended is dropped.

A process is known by (PID, start time): a PID the kernel reuses for another process
is a new process, not the old one come back.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tracer.errors import UsageError

RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # clock ticks after boot (/proc/PID/stat field 22)
    comm: str


@dataclass(frozen=True)
class Selector:
    pids: frozenset[int]
    patterns: tuple[re.Pattern[str], ...]
    cgroups: tuple[str, ...]  # paths inside a cgroup hierarchy, e.g. /system.slice/x

    def matches(self, pid: int) -> bool:
        if pid in self.pids:
            return True
        if self.patterns:
            line = cmdline(pid)
            if line and any(p.search(line) for p in self.patterns):
                return True
        if self.cgroups:
            for group in cgroups_of(pid):
                if any(group == c or group.startswith(c.rstrip("/") + "/")
                       for c in self.cgroups):
                    return True
        return False


def parse_selector(pids: Iterable[int], patterns: Iterable[str],
                   cgroups: Iterable[str]) -> Selector:
    """One-line errors for a bad pattern or a cgroup that does not exist."""
    compiled = []
    for text in patterns:
        try:
            compiled.append(re.compile(text))
        except re.error as err:
            raise UsageError(f"--match: {text!r} is not a regular expression: {err}") from None
    groups = [_group_path(path) for path in cgroups]
    selector = Selector(frozenset(pids), tuple(compiled), tuple(groups))
    if not (selector.pids or selector.patterns or selector.cgroups):
        raise UsageError("say what to watch: -p PID, --match REGEX or --cgroup PATH")
    return selector


def cmdline(pid: int) -> str | None:
    """The command line, arguments joined by spaces (None for a kernel thread or gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or None


def is_natrace(pid: int) -> bool:
    """Another natrace (its command line holds the patterns it was given): never
    matched by a pattern or a cgroup, only by -p."""
    line = cmdline(pid) or ""
    return any(os.path.basename(word) == "natrace" for word in line.split()[:2])


def cgroup_mounts() -> list[str]:
    """Mount points of the cgroup hierarchies (v2 and v1: hybrid hosts have both)."""
    try:
        with open("/proc/self/mounts") as fh:
            return [f[1] for f in (line.split() for line in fh)
                    if len(f) > 2 and f[2] in ("cgroup2", "cgroup")]
    except OSError:
        return []


def _group_path(path: str) -> str:
    """A --cgroup argument as a path inside its hierarchy: a mounted group's directory
    (/sys/fs/cgroup/system.slice/x.service) or the group's own path
    (/system.slice/x.service), which must exist in some hierarchy."""
    mounts = cgroup_mounts()
    for mount in sorted(mounts, key=len, reverse=True):
        if path.rstrip("/") == mount or path.startswith(mount.rstrip("/") + "/"):
            if os.path.isfile(os.path.join(path, "cgroup.procs")):
                return "/" + path[len(mount):].strip("/")
            break
    rel = "/" + path.strip("/")
    if any(os.path.isfile(os.path.join(m + rel, "cgroup.procs")) for m in mounts):
        return rel
    raise UsageError(f"--cgroup: {path} is not a cgroup (no cgroup.procs there or under "
                     "any cgroup mount)")


def cgroups_of(pid: int) -> list[str]:
    """The process's groups, one per hierarchy (/proc/PID/cgroup's third fields)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return [line.rstrip("\n").split(":", 2)[2] for line in fh if line.count(":") >= 2]
    except OSError:
        return []


def read_proc(pid: int) -> Proc | None:
    """PID, start time and comm; None when gone, a zombie or a kernel thread."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X") or int(fields[6]) & 0x00200000:  # PF_KTHREAD
        return None
    return Proc(pid, int(fields[19]), comm)


def _ancestors(pid: int) -> set[int]:
    """pid and its parents: the agent never watches itself or the shell that started it
    (whose command line holds the --match pattern too)."""
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


class Discovery:
    """The set of matching processes, and what changed since the last scan."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self.known: dict[int, Proc] = {}
        self._exclude = _ancestors(os.getpid())
        # -p PIDs are that process only: the PID reused later is someone else
        self._pinned = {p.pid: p.start for p in map(read_proc, selector.pids) if p}
        # (PID, start time) that did not match, and when to look again: a command line
        # can change (exec, or a shell's `exec node ...`), but not every scan
        self._rejected: dict[int, tuple[int, float]] = {}

    def scan(self) -> tuple[list[Proc], list[Proc]]:
        """(processes that appeared, processes that ended) since the last scan."""
        seen: dict[int, Proc] = {}
        rejected: dict[int, tuple[int, float]] = {}
        now = time.monotonic()
        for pid in self._candidates():
            if pid in self._exclude:
                continue
            old = self.known.get(pid)
            proc = read_proc(pid)
            if proc is None:
                continue
            if old is not None and old.start == proc.start:
                seen[pid] = old
            elif self._pinned.get(pid, proc.start) != proc.start:
                continue
            elif (r := self._rejected.get(pid)) and r[0] == proc.start and r[1] > now:
                rejected[pid] = r
            elif self.selector.matches(pid) and (pid in self.selector.pids
                                                 or not is_natrace(pid)):
                seen[pid] = proc
            else:
                rejected[pid] = (proc.start, now + RECHECK_SECONDS)
        self._rejected = rejected
        ended = [p for pid, p in self.known.items() if seen.get(pid) != p]
        new = [p for pid, p in seen.items() if self.known.get(pid) != p]
        self.known = seen
        return new, ended

    def forget(self, pid: int) -> None:
        """Match this process again at the next scan (it exec'd another program)."""
        self.known.pop(pid, None)
        self._rejected.pop(pid, None)

    def _candidates(self) -> Iterable[int]:
        if not self.selector.patterns and not self.selector.cgroups:
            return self.selector.pids
        return (int(d) for d in os.listdir("/proc") if d.isdigit())
