"""Which allocator a target really uses, and where its entry points are.

Found from the files the target maps (or will map), never from a hard-coded libc
path: glibc, jemalloc, tcmalloc and mimalloc, with prefixed builds (je_malloc)
and allocators linked statically into the executable.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

# symbol -> BPF entry program; the malloc family also gets alloc_return (a uretprobe).
FAMILY: dict[str, str] = {
    "malloc": "malloc_enter",
    "calloc": "calloc_enter",
    "realloc": "realloc_enter",
    "reallocarray": "reallocarray_enter",
    "posix_memalign": "posix_memalign_enter",
    "aligned_alloc": "memalign_enter",
    "memalign": "memalign_enter",
    "valloc": "malloc_enter",
    "pvalloc": "pvalloc_enter",
    "free": "free_enter",
    "cfree": "free_enter",
}
# Helpers without frame pointers that return a block allocated inside them: probed at
# entry only, for the return address into their caller, which the stacks of the blocks
# allocated inside them get back (a frame-pointer walk skips it). No uretprobe: an
# exception thrown through one (std::bad_alloc out of operator new) would find the
# trampoline's address on the stack, no unwind info for it, and terminate the program.
WRAPPERS = ("strdup", "__strdup", "strndup", "__strndup", "wcsdup")
FAMILY.update({name: "wrapper_enter" for name in WRAPPERS})
# C++ operator new (size first in every variant) and operator delete (pointer first).
CXX_NEW = ("_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t",
           "_ZnwmSt11align_val_t", "_ZnamSt11align_val_t",
           "_ZnwmSt11align_val_tRKSt9nothrow_t", "_ZnamSt11align_val_tRKSt9nothrow_t")
CXX_DELETE = ("_ZdlPv", "_ZdaPv", "_ZdlPvm", "_ZdaPvm", "_ZdlPvSt11align_val_t",
              "_ZdaPvSt11align_val_t", "_ZdlPvmSt11align_val_t", "_ZdaPvmSt11align_val_t",
              "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t")
ENTRY_ONLY = frozenset({"free_enter", "wrapper_enter"})  # BPF programs with no uretprobe
_PREFIXES = ("", "je_", "tc_", "mi_")
_LIBSTDCXX = re.compile(r"(^|/)libstdc\+\+\.so")
_MALLOC_LIBRARY = re.compile(r"(^|/)lib(jemalloc|tcmalloc|mimalloc)[^/]*\.so")


def programs_for(path: str, static: bool = False) -> dict[str, str]:
    """Symbol -> BPF entry program for one file. libstdc++'s operator new calls malloc:
    a wrapper (its caller becomes frame 0), in libstdc++ or linked into a static
    executable. jemalloc's, tcmalloc's and mimalloc's own new and delete bypass their
    malloc and free: probed as malloc and free themselves (peers miss tcmalloc's new
    entirely)."""
    programs = dict(FAMILY)
    if static or _LIBSTDCXX.search(path):
        programs.update({name: "wrapper_enter" for name in CXX_NEW})
    elif _MALLOC_LIBRARY.search(path):
        programs.update({name: "malloc_enter" for name in CXX_NEW})
        programs.update({name: "free_enter" for name in CXX_DELETE})
    return programs
_ALLOCATOR_FILE = re.compile(
    r"(^|/)(libc\.so|libc-[\d.]+\.so|ld-musl-[^/]*\.so|libjemalloc[^/]*\.so|"
    r"libtcmalloc[^/]*\.so|libmimalloc[^/]*\.so|libstdc\+\+\.so)"
)


@dataclass(frozen=True)
class EntryPoint:
    """One allocator function to probe: symbol name, ELF vaddr, size, file offset."""

    path: str
    symbol: str
    family_name: str
    vaddr: int
    size: int
    file_offset: int
    program: str  # the BPF entry program (bpf/alloc.bpf.c)

    @property
    def has_return(self) -> bool:
        return self.program not in ENTRY_ONLY

    @property
    def null_first_arg_ignored(self) -> bool:
        """free(NULL) records nothing: its probe may sit past the NULL test."""
        return self.program == "free_enter"


def candidate_files(paths: Iterable[str], executable: str | None) -> list[str]:
    """Allocator libraries among mapped files, plus the executable (static allocators)."""
    seen: dict[str, None] = {}
    for path in paths:
        if _ALLOCATOR_FILE.search(path):
            seen.setdefault(path, None)
    if executable:
        seen.setdefault(executable, None)
    return list(seen)


def entry_points(path: str, executable: bool = False) -> list[EntryPoint]:
    """The malloc family defined in one ELF file, one entry per address (aliases merged).
    `executable`: the file is the target's program (static when it has no loader)."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            static = not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
            programs = programs_for(path, static and executable)
            symbols = _defined_functions(elf, fh, programs, static)
            loads = [
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
    except (OSError, ELFError, ValueError):
        return []
    by_addr: dict[int, EntryPoint] = {}
    for family_name in programs:  # the order decides which alias names an address
        for prefix in _PREFIXES:
            sym = symbols.get(prefix + family_name)
            if sym is None:
                continue
            vaddr, size = sym
            if vaddr in by_addr:
                break
            offset = vaddr_to_offset(loads, vaddr)
            if offset is not None:
                by_addr[vaddr] = EntryPoint(path, prefix + family_name, family_name, vaddr,
                                            size, offset, programs[family_name])
            break
    return list(by_addr.values())


_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_FUNC_TYPES = (2, 10)  # STT_FUNC, STT_GNU_IFUNC


def _defined_functions(elf: ELFFile, fh: BinaryIO, programs: dict[str, str],
                       static: bool) -> dict[str, tuple[int, int]]:
    """The malloc family's defined functions: (vaddr, size) by name.

    A dynamically linked file interposes malloc only through .dynsym, so only a
    static executable's .symtab is read. The table is scanned raw: node's 75,000
    dynamic symbols took pyelftools 3.7 s, and attaching must take well under 2 s.
    """
    names = [".dynsym", ".symtab"] if static else [".dynsym"]
    wanted = frozenset((p + f).encode() for p in _PREFIXES for f in programs)
    found: dict[str, tuple[int, int]] = {}
    for name in names:
        section = elf.get_section_by_name(name)
        if not isinstance(section, SymbolTableSection) or elf.elfclass != 64:
            continue
        strtab = elf.get_section(section["sh_link"])
        fh.seek(strtab["sh_offset"])
        strings = fh.read(strtab["sh_size"])
        fh.seek(section["sh_offset"])
        table = fh.read(section["sh_size"] // _SYM.size * _SYM.size)
        for st_name, info, _other, shndx, value, size in _SYM.iter_unpack(table):
            if shndx == 0 or not value or info & 0xF not in _FUNC_TYPES:
                continue
            sym = strings[st_name:strings.find(b"\0", st_name)]
            if sym in wanted and sym.decode() not in found:
                found[sym.decode()] = (value, size)
    return found


def vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    """A virtual address as a file offset, given the (p_vaddr, p_offset, p_filesz) of the
    file's PT_LOAD segments; None outside them."""
    for seg_vaddr, seg_offset, filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + filesz:
            return vaddr - seg_vaddr + seg_offset
    return None


def inode_of(path: str) -> tuple[int, int] | None:
    """A file's (device, inode): uprobes live on inodes, whatever path reached them."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def find_entry_points(paths: Iterable[str], executable: str | None) -> list[EntryPoint]:
    """Every allocator entry point among the target's files, executable included."""
    points: list[EntryPoint] = []
    inodes: set[tuple[int, int]] = set()
    for path in candidate_files(paths, executable):
        try:
            st = os.stat(path)
        except OSError:
            continue
        # uprobes live on inodes: /lib/x and /usr/lib/x must not be probed twice
        if (st.st_dev, st.st_ino) in inodes:
            continue
        inodes.add((st.st_dev, st.st_ino))
        points.extend(entry_points(path, path == executable))
    return points
