"""natrace's in-process sampler (sampler/, libnatrace_sampler.so): where the built
library is, and its configuration inside a running process (`natrace_sampler` in its
.dynsym, layout in sampler/README.md), read and written through /proc/PID/mem."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from tracer.errors import UsageError

LIBRARY = "libnatrace_sampler.so"
DEFAULT_PERIOD = 512 << 10
_CONFIG_SYMBOL = "natrace_sampler"
_CONFIG = struct.Struct("<8sIIQQQQ")  # magic, version, set_slots, period, sampled, dropped, tracked
_MAGIC = b"NTSAMPLR"
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

    def read(self) -> Counters | None:
        try:
            with open(f"/proc/{self.pid}/mem", "rb") as mem:
                mem.seek(self.address)
                raw = mem.read(_CONFIG.size)
        except (OSError, ValueError):
            return self.last
        if len(raw) != _CONFIG.size:
            return self.last
        magic, version, _slots, period, sampled, dropped, _tracked = _CONFIG.unpack(raw)
        if magic != _MAGIC or version != 1:
            return None
        self.last = Counters(period, sampled, dropped)
        return self.last

    def set_period(self, period: int) -> None:
        """Mean bytes between sample points, written before the probes count in."""
        with open(f"/proc/{self.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(self.address + _PERIOD_OFFSET)
            mem.write(struct.pack("<Q", period))


def _config_symbol(path: str) -> int | None:
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
