"""Our own copy of a process's memory map, kept with its history.

/proc/PID/maps only tells what is mapped *now*: once a library is dlclose'd or the
process exits, the kernel forgets it and every address in it becomes unnameable.
`MapsHistory` keeps every file-backed (and every executable) mapping it has ever seen,
so stacks captured earlier can still be symbolized later.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

DELETED_SUFFIX = " (deleted)"
MEMFD_PREFIX = "/memfd:"
_MAX_SYMLINKS = 40


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    offset: int = 0
    perms: str = "r-xp"
    dev: str = "00:00"
    inode: int = 0
    path: str = ""

    @property
    def deleted(self) -> bool:
        """The file was unlinked (or replaced) after it was mapped."""
        return self.path.endswith(DELETED_SUFFIX)

    @property
    def clean_path(self) -> str:
        """The path without the kernel's ` (deleted)` suffix."""
        return self.path[: -len(DELETED_SUFFIX)] if self.deleted else self.path

    @property
    def memfd(self) -> bool:
        return self.path.startswith(MEMFD_PREFIX)

    @property
    def special(self) -> bool:
        """A kernel pseudo-mapping such as [heap], [stack], [vdso], [vvar], [anon:name]."""
        return self.path.startswith("[")

    @property
    def vdso(self) -> bool:
        return self.path == "[vdso]"

    @property
    def anon(self) -> bool:
        """No file behind it (plain anonymous memory or a kernel pseudo-mapping)."""
        return self.inode == 0 and not self.memfd

    @property
    def file_backed(self) -> bool:
        """A real file (possibly deleted or a memfd) whose ELF contents can be read."""
        return bool(self.path) and not self.special and (self.inode != 0 or self.memfd)

    @property
    def executable(self) -> bool:
        return len(self.perms) > 2 and self.perms[2] == "x"

    @property
    def dev_numbers(self) -> tuple[int, int] | None:
        """(major, minor) of the device the file lives on."""
        try:
            major, minor = self.dev.split(":")
            return int(major, 16), int(minor, 16)
        except ValueError:
            return None

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def file_offset(self, addr: int) -> int:
        """Offset in the mapped file of the byte at `addr`."""
        return addr - self.start + self.offset


def parse_line(line: str) -> Mapping | None:
    """Parse one maps line; None for anything that does not look like one (never raises)."""
    try:
        parts = line.rstrip("\n").split(None, 5)
        if len(parts) < 5:
            return None
        lo, _, hi = parts[0].partition("-")
        start, end = int(lo, 16), int(hi, 16)
        if end <= start or len(parts[1]) != 4:
            return None
        offset = int(parts[2], 16)
        inode = int(parts[4])
        # The path starts after the padding that follows the inode column.
        path = parts[5].strip() if len(parts) > 5 else ""
        return Mapping(start, end, offset, parts[1], parts[3], inode, path)
    except (ValueError, IndexError, AttributeError):
        return None


def _keep_in_history(m: Mapping) -> bool:
    # Plain anonymous read-write memory churns constantly (V8 maps thousands of pages a
    # second) and never holds code: only the current snapshot keeps it.
    return m.file_backed or m.executable or m.vdso


class MapsHistory:
    """Every mapping a process has shown, newest first on lookup.

    `root` overrides where /proc lives (tests); `pid=None` with `from_lines` makes a
    history that is not attached to any process (recorded maps).
    """

    def __init__(self, pid: int | None, root: str | None = None, *, _read: bool = True) -> None:
        self.pid = pid
        self.proc = root if root is not None else "/proc"
        self._history: list[Mapping] = []
        self._seen: set[Mapping] = set()
        self._current: list[Mapping] = []
        self._current_starts: list[int] = []
        self.gone = False  # a re-read found the process gone: the history is its last read
        self.same_root = self._check_same_root()
        if _read and pid is not None:
            self.refresh()

    @classmethod
    def from_lines(cls, lines: Iterable[str], pid: int | None = None,
                   root: str | None = None) -> MapsHistory:
        """A history built from recorded maps lines (tests, saved recordings)."""
        h = cls(pid, root, _read=False)
        h.update(lines)
        return h

    # -- reading --------------------------------------------------------------------

    def _check_same_root(self) -> bool:
        """Does the process see the same / as we do? Then plain paths are its paths."""
        if self.pid is None:
            return True
        try:
            a, b = os.stat(f"{self.proc}/{self.pid}/root"), os.stat("/")
            return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        except OSError:
            return True

    def _read_lines(self) -> list[str] | None:
        try:
            with open(f"{self.proc}/{self.pid}/maps", encoding="utf-8",
                      errors="surrogateescape") as f:
                return f.readlines()
        except OSError:
            return None

    def refresh(self) -> bool:
        """Re-read the process's maps; True when a mapping we had not seen appeared.

        After the process exits this is a no-op returning False: the history stays.
        """
        if self.pid is None:
            return False
        lines = self._read_lines()
        if not lines:  # gone, or a zombie (its maps read empty): keep the last read
            self.gone = True
            return False
        return self.update(lines)

    def update(self, lines: Iterable[str]) -> bool:
        """Absorb one snapshot of maps lines (recorded or just read); True if any is new."""
        current = [m for m in (parse_line(x) for x in lines) if m is not None]
        current.sort(key=lambda m: m.start)
        changed = False
        for m in current:
            if m not in self._seen:
                changed = True
                self._seen.add(m)
                if _keep_in_history(m):
                    self._history.append(m)
        self._current = current
        self._current_starts = [m.start for m in current]
        return changed

    # -- lookup ---------------------------------------------------------------------

    @property
    def mappings(self) -> list[Mapping]:
        """The latest snapshot, sorted by address."""
        return list(self._current)

    @property
    def history(self) -> list[Mapping]:
        """All kept mappings in the order they were first seen."""
        return list(self._history)

    def find(self, addr: int) -> Mapping | None:
        """The newest mapping containing `addr`, looking in the current snapshot first."""
        i = bisect.bisect_right(self._current_starts, addr) - 1
        if i >= 0 and self._current[i].contains(addr):
            return self._current[i]
        for m in reversed(self._history):
            if m.contains(addr):
                return m
        return None

    def mappings_of(self, path: str) -> list[Mapping]:
        """Every kept mapping of one file (by clean path), in first-seen order."""
        return [m for m in self._history if m.clean_path == path]

    def load_base(self, mapping: Mapping) -> int:
        """Address where file offset 0 of `mapping`'s file is (or would be) mapped."""
        return mapping.start - mapping.offset

    # -- reaching the file ----------------------------------------------------------

    def module_path(self, mapping: Mapping) -> str | None:
        """A path through which *we* can open the file behind `mapping`, or None.

        Tries, in order: /proc/PID/map_files/START-END for deleted and memfd files; the
        file under /proc/PID/root resolved component by component so that no symlink
        can lead out of the process's root; map_files for the rest; and finally the
        plain path, when the process shares our root and the inode still matches.
        """
        if not mapping.file_backed:
            return None
        mf = None
        if self.pid is not None:
            mf = f"{self.proc}/{self.pid}/map_files/{mapping.start:x}-{mapping.end:x}"
        if (mapping.deleted or mapping.memfd) and mf and _readable(mf):
            return mf
        if mapping.memfd:
            return None
        path = mapping.clean_path
        if self.pid is not None:
            inside = resolve_in_root(f"{self.proc}/{self.pid}/root", path)
            if inside is not None and _readable(inside):
                return inside
            if mf and _readable(mf):
                return mf
        if self.same_root and not mapping.deleted and _same_file(path, mapping):
            return path
        return None


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _same_file(path: str, mapping: Mapping) -> bool:
    """Is `path` still the very file that was mapped (same inode, same device)?"""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    # Only the inode is compared: overlay filesystems show another device in maps
    # than stat reports.
    return not (mapping.inode and st.st_ino != mapping.inode)


def resolve_in_root(root: str, path: str) -> str | None:
    """`root` + `path` with every symlink resolved *inside* root (like chroot would).

    Absolute link targets restart from root and `..` stops at root, so a hostile
    container cannot point us at the host's files. None when a component is missing
    or links loop.
    """
    pending = [c for c in path.split("/") if c and c != "."]
    pending.reverse()
    parts: list[str] = []
    links = 0
    while pending:
        comp = pending.pop()
        if comp == "..":
            if parts:
                parts.pop()
            continue
        candidate = root + "/" + "/".join(parts + [comp])
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            try:
                target = os.readlink(candidate)
            except OSError:
                return None
            if target.startswith("/"):
                parts = []
            new = [c for c in target.split("/") if c and c != "."]
            pending.extend(reversed(new))
            continue
        parts.append(comp)
    return root + "/" + "/".join(parts)
