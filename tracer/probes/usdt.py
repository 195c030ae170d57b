"""The OpenTelemetry memory-profiling USDT probes (provider otel_memory) in a process's
files: read from their SystemTap notes (.note.stapsdt), so natrace attaches them itself,
with the kernel counting the semaphores in and out (uprobe ref_ctr_offset), and reads
the arguments where the contract puts them (the SysV argument registers).

Any library that implements the contract qualifies: natrace's own sampler (sampler/)
or another (an allocator, an SDK)."""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from tracer.errors import TargetError
from tracer.probes.allocators import vaddr_to_offset

PROVIDER = "otel_memory"
#: Where each probe's arguments must be: what bpf/alloc.bpf.c's otel_* programs read.
EXPECTED_ARGS = {"alloc": ("8@%rdi", "8@%rsi", "8@%rdx"), "free": ("8@%rdi",)}
_NT_STAPSDT = 3


@dataclass(frozen=True)
class UsdtProbe:
    """One probe site in one file: where to put the uprobe and its semaphore."""

    path: str
    name: str  # "alloc" or "free"
    vaddr: int  # the probe's address in the file's own address space
    offset: int  # ... as a file offset (what the kernel's uprobe wants)
    semaphore_offset: int  # file offset of its semaphore, 0 when it has none
    args: tuple[str, ...]


def otel_probes(files: list[str]) -> list[UsdtProbe]:
    """Every otel_memory:alloc/free probe in these files. A provider with only one of
    the two, or arguments elsewhere than the contract's registers, is refused."""
    found: list[UsdtProbe] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        probes = _probes_in(path, st.st_ino, st.st_mtime_ns)
        if not probes:
            continue
        names = {p.name for p in probes}
        if names != set(EXPECTED_ARGS):
            raise TargetError(f"{path} has otel_memory:{'/'.join(sorted(names))} but not "
                              "both alloc and free: natrace needs both to track live memory")
        for p in probes:
            if p.args != EXPECTED_ARGS[p.name]:
                raise TargetError(f"{path}: otel_memory:{p.name} passes its arguments as "
                                  f"{' '.join(p.args) or 'nothing'}, not "
                                  f"{' '.join(EXPECTED_ARGS[p.name])} as the OpenTelemetry "
                                  "contract has them")
        found += probes
    return found


@functools.cache
def _probes_in(path: str, _inode: int, _mtime_ns: int) -> tuple[UsdtProbe, ...]:
    """(cached per file version: node maps hundreds of files, most without notes)"""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            notes = elf.get_section_by_name(".note.stapsdt")
            if notes is None:
                return ()
            base_sec = elf.get_section_by_name(".stapsdt.base")
            loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"])
                     for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            data = notes.data()
            base_addr = base_sec["sh_addr"] if base_sec is not None else None
    except (OSError, ELFError, struct.error):
        return ()
    out = []
    for pc, base, sem, provider, name, args in _stapsdt_notes(data):
        if provider != PROVIDER or name not in EXPECTED_ARGS:
            continue
        # prelink may have moved the file: the notes' addresses follow .stapsdt.base
        shift = base_addr - base if base_addr is not None and base else 0
        pc += shift
        offset = vaddr_to_offset(loads, pc)
        if offset is None:
            continue
        sem_off = vaddr_to_offset(loads, sem + shift) if sem else 0
        out.append(UsdtProbe(path, name, pc, offset, sem_off or 0, tuple(args.split())))
    return tuple(out)


def _stapsdt_notes(data: bytes) -> list[tuple[int, int, int, str, str, str]]:
    """(pc, base, semaphore, provider, name, args) of each SystemTap note (64-bit)."""
    out = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        owner = data[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = data[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if ntype != _NT_STAPSDT or owner != b"stapsdt" or len(desc) < 24:
            continue
        pc, base, sem = struct.unpack_from("<QQQ", desc, 0)
        parts = desc[24:].split(b"\0")
        if len(parts) < 3:
            continue
        provider, name, args = (p.decode(errors="replace") for p in parts[:3])
        out.append((pc, base, sem, provider, name, args))
    return out
