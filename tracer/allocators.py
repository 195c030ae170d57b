"""Which allocator a target really uses, and where its entry points are.

Found from the files the target maps (or will map), never from a hard-coded libc
path: glibc, jemalloc, tcmalloc and mimalloc, with prefixed builds (je_malloc)
and allocators linked statically into the executable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

# symbol -> BPF entry program; functions with a return value also get alloc_return.
FAMILY: dict[str, str] = {
    "malloc": "malloc_enter",
    "calloc": "calloc_enter",
    "realloc": "realloc_enter",
    "reallocarray": "reallocarray_enter",
    "posix_memalign": "posix_memalign_enter",
    "aligned_alloc": "memalign_enter",
    "memalign": "memalign_enter",
    "valloc": "malloc_enter",
    "pvalloc": "malloc_enter",
    "free": "free_enter",
    "cfree": "free_enter",
}
# Helpers without frame pointers that return a block allocated inside them: probed
# so that their caller, not the helper, is frame 0 of the allocation's stack.
WRAPPERS = (
    "strdup", "__strdup", "strndup", "__strndup", "wcsdup",
    "_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t", "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t", "_ZnamSt11align_val_tRKSt9nothrow_t",
)
FAMILY.update({name: "wrapper_enter" for name in WRAPPERS})
RETURNS_NOTHING = {"free", "cfree"}
_PREFIXES = ("", "je_", "tc_", "mi_")
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

    @property
    def program(self) -> str:
        return FAMILY[self.family_name]

    @property
    def has_return(self) -> bool:
        return self.family_name not in RETURNS_NOTHING


def candidate_files(paths: Iterable[str], executable: str | None) -> list[str]:
    """Allocator libraries among mapped files, plus the executable (static allocators)."""
    seen: dict[str, None] = {}
    for path in paths:
        if _ALLOCATOR_FILE.search(path):
            seen.setdefault(path, None)
    if executable:
        seen.setdefault(executable, None)
    return list(seen)


def entry_points(path: str) -> list[EntryPoint]:
    """The malloc family defined in one ELF file, one entry per address (aliases merged)."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            symbols = _defined_functions(elf)
            loads = [
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
    except (OSError, ELFError, ValueError):
        return []
    by_addr: dict[int, EntryPoint] = {}
    for family_name in FAMILY:  # FAMILY's order decides which alias names an address
        for prefix in _PREFIXES:
            sym = symbols.get(prefix + family_name)
            if sym is None:
                continue
            vaddr, size = sym
            if vaddr in by_addr:
                break
            offset = _vaddr_to_offset(loads, vaddr)
            if offset is not None:
                by_addr[vaddr] = EntryPoint(path, prefix + family_name, family_name, vaddr,
                                            size, offset)
            break
    return list(by_addr.values())


def _defined_functions(elf: ELFFile) -> dict[str, tuple[int, int]]:
    wanted = {p + f for p in _PREFIXES for f in FAMILY}
    found: dict[str, tuple[int, int]] = {}
    for name in (".dynsym", ".symtab"):
        section = elf.get_section_by_name(name)
        if not isinstance(section, SymbolTableSection):
            continue
        for sym in section.iter_symbols():
            base = sym.name.split("@", 1)[0]
            if (
                base in wanted
                and base not in found
                and sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC")
                and sym["st_shndx"] != "SHN_UNDEF"
                and sym["st_value"]
            ):
                found[base] = (sym["st_value"], sym["st_size"])
    return found


def _vaddr_to_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    for seg_vaddr, seg_offset, filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + filesz:
            return vaddr - seg_vaddr + seg_offset
    return None


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
        points.extend(entry_points(path))
    return points
