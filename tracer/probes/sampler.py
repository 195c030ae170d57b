"""natrace's in-process sampler (sampler/, libnatrace_sampler.so): where the built
library is, and its configuration inside a running process (`natrace_sampler` in its
.dynsym, layout in sampler/README.md), read and written through /proc/PID/mem."""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from tracer.errors import UsageError
from tracer.probes.usdt import UsdtProbe, otel_probes

LIBRARY = "libnatrace_sampler.so"
DEFAULT_PERIOD = 512 << 10
_CONFIG_SYMBOL = "natrace_sampler"
_CONFIG = struct.Struct("<8sIIQQQQ")  # magic, version, set_slots, period, sampled, dropped, tracked
_INTERPOSING = struct.Struct("<I")  # version 2, after version 1's fields
_MAGIC = b"NTSAMPLR"
_VERSIONS = (1, 2)
_PERIOD_OFFSET = 16


def library_path() -> Path:
    """The built sampler (NATRACE_SAMPLER overrides); a one-line error when missing."""
    override = os.environ.get("NATRACE_SAMPLER")
    path = Path(override) if override else (
        Path(__file__).resolve().parent.parent.parent / "sampler" / "build" / LIBRARY)
    if not path.is_file():
        raise UsageError(f"the in-process sampler is not built ({path} is missing): run "
                         "scripts/provision.sh")
    return path


@dataclass(frozen=True)
class Counters:
    period: int
    sampled: int  # alloc probes the process fired
    dropped: int  # sample points it could not fire (its address set was full)


class SamplerConfig:
    """natrace_sampler in one process's copy of the library."""

    def __init__(self, pid: int, address: int) -> None:
        self.pid = pid
        self.address = address
        self.last: Counters | None = None  # kept once the process is gone
        self.gone = False  # its memory could not be read any more: `last` is all there is

    @classmethod
    def find(cls, pid: int, library: str) -> SamplerConfig | None:
        """The configuration of `library` as mapped in `pid`; None when `library` is not
        natrace's sampler (another otel_memory provider) or not mapped yet."""
        value = _config_symbol(library)
        base = _load_base(pid, library)
        if value is None or base is None:
            return None
        config = cls(pid, base + value)
        return config if config.read() is not None else None

    def _raw(self, size: int) -> bytes | None:
        try:
            with open(f"/proc/{self.pid}/mem", "rb") as mem:
                mem.seek(self.address)
                raw = mem.read(size)
        except (OSError, ValueError):
            return None
        return raw if len(raw) == size else None

    def read(self) -> Counters | None:
        raw = self._raw(_CONFIG.size)
        if raw is None:
            self.gone = True
            return self.last
        magic, version, _slots, period, sampled, dropped, _tracked = _CONFIG.unpack(raw)
        if magic != _MAGIC or version not in _VERSIONS:
            return None
        self.last = Counters(period, sampled, dropped)
        return self.last

    def interposes(self) -> bool:
        """Whether the process's malloc is this copy's (its constructor checked): a
        sampler dlopen'ed after the allocator is called by nothing and fires nothing.
        A version 1 library did not say: taken as preloaded."""
        raw = self._raw(_CONFIG.size + _INTERPOSING.size)
        if raw is None or _CONFIG.unpack_from(raw)[1] < 2:  # its version
            return True
        return bool(_INTERPOSING.unpack_from(raw, _CONFIG.size)[0])

    def set_period(self, period: int) -> None:
        """Mean bytes between sample points, written before the probes count in."""
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(self.address + _PERIOD_OFFSET)
            mem.write(struct.pack("<Q", period))


def firing_probes(pid: int, files: list[str]) -> tuple[list[UsdtProbe], list[str]]:
    """The otel_memory probes in `files` that can fire in `pid`, and the copies of
    natrace's sampler left out because they say they interpose nothing (dlopen'ed after
    the allocator: nothing calls their malloc). A copy not mapped yet (a launched
    command before its exec) counts as firing: natrace preloads it."""
    probes = otel_probes(files)
    inert = sorted(lib for lib in {p.path for p in probes}
                   if (config := SamplerConfig.find(pid, lib)) and not config.interposes())
    return [p for p in probes if p.path not in inert], inert


def _config_symbol(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _config_symbol_in(path, st.st_ino, st.st_mtime_ns)


@functools.cache
def _config_symbol_in(path: str, _inode: int, _mtime_ns: int) -> int | None:
    """(cached per file version: read on every poll of a process without natrace's
    sampler)"""
    try:
        with open(path, "rb") as fh:
            dynsym = ELFFile(fh).get_section_by_name(".dynsym")
            if dynsym is None:
                return None
            syms = dynsym.get_symbol_by_name(_CONFIG_SYMBOL)  # type: ignore[attr-defined]
            return int(syms[0]["st_value"]) if syms else None
    except (OSError, ELFError):
        return None


def _load_base(pid: int, path: str) -> int | None:
    """Where `path` is loaded in `pid`: its first mapping's start less its file offset
    (the library's first PT_LOAD is at address 0)."""
    try:
        real = os.stat(path)
        with open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                # the inode and name (overlay filesystems show another device in maps)
                if int(parts[4]) != real.st_ino or \
                        os.path.basename(parts[5].rstrip("\n")) != os.path.basename(path):
                    continue
                return int(parts[0].split("-")[0], 16) - int(parts[2], 16)
    except (OSError, ValueError):
        return None
    return None
