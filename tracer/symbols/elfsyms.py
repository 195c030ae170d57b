"""Function symbols of one ELF file, indexed once and cached on disk.

A return address is only useful to a person once it has a name. Names come from
.symtab when the file has it, else from a separate debug file (found by build-id or
.gnu_debuglink, like gdb does), else from .dynsym. pyelftools is used for the headers
and DWARF only: the symbol tables themselves are decoded with `struct.iter_unpack`,
because node's ~110k-entry .symtab takes pyelftools tens of seconds per symbol object.

Every failure on a hostile or truncated file ends in "no symbols", never an exception.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

from elftools.dwarf.ranges import BaseAddressEntry
from elftools.elf.elffile import ELFFile

from tracer.symbols.leb128 import sleb, uleb

DEFAULT_DEBUG_DIRS: tuple[str, ...] = ("/usr/lib/debug",)
CACHE_VERSION = 2  # 2: the entry point named when no symbol covers it
_MAGIC = b"NATSYM1\0"
_FUNC_TYPES = (2, 10)  # STT_FUNC, STT_GNU_IFUNC
_SHN_UNDEF, _SHN_LORESERVE = 0, 0xFF00
_MAX_LINE_SCAN = 16 << 20  # decode all of .debug_line without aranges only below this

#: Counters that tests (and `natrace doctor`) read: how often we indexed vs. hit the cache.
STATS: collections.Counter[str] = collections.Counter()


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/natrace, else ~/.cache/natrace."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "natrace")


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD program header: how file offsets become virtual addresses."""

    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


class ElfSymbols:
    """Sorted function symbols of one ELF file, plus lazily decoded line info.

    `cache_dir=None` uses the default cache directory, `cache_dir=""` disables the cache.
    `logical_path` is the path the traced process knows the file by (used to find a
    .gnu_debuglink target under the debug dirs when `path` is a /proc/PID/root path).
    """

    def __init__(self, path: str, *, debug_dirs: Sequence[str] | None = None,
                 cache_dir: str | None = None, logical_path: str | None = None) -> None:
        self.path = path
        self.logical_path = logical_path or path
        self.debug_dirs = tuple(DEFAULT_DEBUG_DIRS if debug_dirs is None else debug_dirs)
        self.cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        self.build_id: str | None = None
        self.debug_file: str | None = None
        self.source = "none"  # symtab | debug | dynsym | none
        self.segments: list[Segment] = []
        self.from_cache = False
        self.cache_path: str | None = None
        self.error: str | None = None
        self._starts: array.array[int] = array.array("Q")
        self._sizes: array.array[int] = array.array("Q")
        self._names: list[str] = []
        self._line_file: str | None = None  # file whose .debug_line we read
        self._lines: _LineTable | None = None
        try:
            self._load()
        except Exception as e:  # hostile input: pyelftools raises many kinds of errors
            self.error = f"{type(e).__name__}: {e}"
            self._starts, self._sizes, self._names = array.array("Q"), array.array("Q"), []

    # -- public ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._names)

    def symbols(self) -> Iterator[tuple[int, int, str]]:
        """(vaddr, size, name) for every indexed function, by address."""
        return zip(self._starts, self._sizes, self._names)

    def address_of(self, name: str) -> int | None:
        """Vaddr of the function named `name` (linear; for tests and diagnostics)."""
        for start, _, n in self.symbols():
            if n == name:
                return start
        return None

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """(symbol, offset into it) of the function covering `vaddr`, or None.

        A sized symbol covers [start, start+size); a zero-size one covers up to the
        next symbol (or the end of its segment).
        """
        starts = self._starts
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0:
            return None
        start, size = starts[i], self._sizes[i]
        if size == 0:
            end = starts[i + 1] if i + 1 < len(starts) else self._segment_end(start)
            if end is None or vaddr < end:
                return self._names[i], vaddr - start
            return None
        # Walk back a little: a small symbol may sit inside a bigger one.
        for j in range(i, max(-1, i - 4), -1):
            start, size = starts[j], self._sizes[j]
            if start <= vaddr < start + size:
                return self._names[j], vaddr - start
        return None

    def file_offset_to_vaddr(self, offset: int) -> int | None:
        """The link-time virtual address of a file offset, through the PT_LOAD headers."""
        for s in self.segments:
            if s.offset <= offset < s.offset + max(s.filesz, 1):
                return offset - s.offset + s.vaddr
        return None

    @property
    def has_debug_line(self) -> bool:
        return self._line_file is not None

    def line_for(self, vaddr: int) -> tuple[str, int] | None:
        """(source file, line) of `vaddr` from .debug_line; decoded on first use only."""
        try:
            table = self._dwarf_table()
            return table.lookup(vaddr) if table is not None else None
        except Exception:  # broken DWARF: no line info, never an exception
            self._line_file = None
            return None

    def inlined_at(self, vaddr: int) -> list[Inlined]:
        """The functions inlined at `vaddr`, innermost first, from .debug_info (the file
        holding .debug_line: this one or its debug file); decoded per function on first
        use, kept for the process."""
        try:
            table = self._dwarf_table()
            return table.inlined(vaddr) if table is not None else []
        except Exception:  # broken DWARF: no inlined frames, never an exception
            self._line_file = None
            return []

    def _dwarf_table(self) -> _LineTable | None:
        if self._line_file is None:
            return None
        if self._lines is None:
            self._lines = _line_table(self._line_file)
        return self._lines

    # -- loading --------------------------------------------------------------------

    def _segment_end(self, vaddr: int) -> int | None:
        for s in self.segments:
            if s.vaddr <= vaddr < s.vaddr + s.memsz:
                return s.vaddr + s.memsz
        return None

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            st = os.fstat(f.fileno())
            elf = ELFFile(f)
            self.segments = _load_segments(elf)
            self.build_id = _build_id(elf)
            has_symtab = _has_entries(elf, ".symtab")
            debug_stamp = None
            if not has_symtab:
                self.debug_file = self._find_debug_file(elf)
                if self.debug_file is not None:
                    ds = os.stat(self.debug_file)
                    debug_stamp = [self.debug_file, ds.st_size, ds.st_mtime_ns]
            stamp = {"v": CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "build_id": self.build_id, "debug": debug_stamp}
            self.cache_path = self._cache_file()
            if self.cache_path and self._read_cache(stamp):
                return
            self._index(elf, f, has_symtab)
            STATS["indexed"] += 1
            if self.cache_path:
                self._write_cache(stamp)

    def _index(self, elf: ELFFile, f: IO[bytes], has_symtab: bool) -> None:
        tables: list[tuple[str, list[tuple[int, int, int, str]]]] = []
        if has_symtab:
            self.source = "symtab"
            tables.append(("symtab", _read_symbols(elf, f, ".symtab")))
        elif self.debug_file is not None:
            with open(self.debug_file, "rb") as df:
                syms = _read_symbols(ELFFile(df), df, ".symtab")
            if syms:
                self.source = "debug"
                tables.append(("debug", syms))
        if not tables:
            syms = _read_symbols(elf, f, ".dynsym")
            if syms:
                self.source = "dynsym"
                tables.append(("dynsym", syms))
        best: dict[int, tuple[tuple[int, int, int, int], int, str]] = {}
        for _, syms in tables:
            for value, size, bind, name in syms:
                rank = (_BIND_RANK.get(bind, 3), 0 if size else 1,
                        len(name) - len(name.lstrip("_")), len(name))
                old = best.get(value)
                if old is None:
                    best[value] = (rank, size, name)
                else:
                    size = max(size, old[1])
                    best[value] = (rank, size, name) if rank < old[0] else (old[0], size, old[2])
        keys = sorted(best)
        self._starts = array.array("Q", keys)
        self._sizes = array.array("Q", (best[k][1] for k in keys))
        self._names = [best[k][2] for k in keys]
        entry = elf.header["e_entry"]
        if entry and entry not in best and self.lookup(entry) is None:
            # ld.so's entry point has no symbol left in Debian's build, yet every stack
            # of a program's start-up ends in it (its _start calls _dl_start)
            at = bisect.bisect_left(keys, entry)
            self._starts.insert(at, entry)
            self._sizes.insert(at, 0)
            self._names.insert(at, "_start")
        self._line_file = self._find_line_file(elf)

    def _find_line_file(self, elf: ELFFile) -> str | None:
        if self.debug_file is not None and _file_has_section(self.debug_file, ".debug_line"):
            return self.debug_file
        if elf.get_section_by_name(".debug_line") is not None:
            return self.path
        return None

    def _find_debug_file(self, elf: ELFFile) -> str | None:
        candidates: list[tuple[str, int | None]] = []
        if self.build_id and len(self.build_id) > 2:
            for d in self.debug_dirs:
                candidates.append(
                    (f"{d}/.build-id/{self.build_id[:2]}/{self.build_id[2:]}.debug", None))
        link = _debuglink(elf)
        if link is not None:
            name, crc = link
            for base in (os.path.dirname(self.path), os.path.dirname(self.logical_path)):
                candidates.append((os.path.join(base, name), crc))
                candidates.append((os.path.join(base, ".debug", name), crc))
            logical_dir = os.path.dirname(os.path.abspath(self.logical_path))
            for d in self.debug_dirs:
                candidates.append((d + os.path.join(logical_dir, name), crc))
        seen: set[str] = set()
        for cand, want_crc in candidates:
            if cand in seen or not os.path.isfile(cand):
                continue
            seen.add(cand)
            if os.path.realpath(cand) == os.path.realpath(self.path):
                continue
            if self._debug_file_matches(cand, want_crc):
                return cand
        return None

    def _debug_file_matches(self, cand: str, crc: int | None) -> bool:
        try:
            with open(cand, "rb") as df:
                delf = ELFFile(df)
                theirs = _build_id(delf)
                if self.build_id and theirs:
                    if theirs != self.build_id:
                        return False
                elif crc is not None and _crc32_file(df) != crc:
                    return False
                return _has_entries(delf, ".symtab")
        except Exception:
            return False

    # -- disk cache -----------------------------------------------------------------

    def _cache_file(self) -> str | None:
        if not self.cache_dir:
            return None
        if self.build_id:
            key = self.build_id
        else:
            key = "path-" + hashlib.sha1(
                os.path.abspath(self.path).encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.cache_dir, key + ".nsym")

    def _read_cache(self, stamp: dict[str, Any]) -> bool:
        assert self.cache_path is not None
        try:
            with open(self.cache_path, "rb") as c:
                data = c.read()
        except OSError:
            return False
        try:
            if data[:8] != _MAGIC:
                return False
            (hlen,) = struct.unpack_from("<I", data, 8)
            header = json.loads(data[12:12 + hlen])
            if header.get("stamp") != stamp:
                return False
            n = header["count"]
            pos = 12 + hlen
            starts = array.array("Q")
            starts.frombytes(data[pos:pos + 8 * n])
            sizes = array.array("Q")
            sizes.frombytes(data[pos + 8 * n:pos + 16 * n])
            blob = data[pos + 16 * n:].decode("utf-8", "surrogateescape")
            names = blob.split("\0") if n else []
            if len(starts) != n or len(sizes) != n or len(names) != n:
                return False
            self._starts, self._sizes, self._names = starts, sizes, names
            self.source = header["source"]
            where = header.get("lines")
            self._line_file = (self.debug_file if where == "debug"
                               else self.path if where == "main" else None)
            self.from_cache = True
            STATS["cache_hit"] += 1
            return True
        except (ValueError, KeyError, TypeError, struct.error):
            return False

    def _write_cache(self, stamp: dict[str, Any]) -> None:
        assert self.cache_path is not None
        lines = None
        if self._line_file is not None:
            lines = "debug" if self._line_file == self.debug_file else "main"
        header = json.dumps({"stamp": stamp, "count": len(self._names), "source": self.source,
                             "lines": lines, "path": self.path}).encode()
        tmp = f"{self.cache_path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(tmp, "wb") as c:
                c.write(_MAGIC + struct.pack("<I", len(header)) + header)
                c.write(self._starts.tobytes())
                c.write(self._sizes.tobytes())
                c.write("\0".join(self._names).encode("utf-8", "surrogateescape"))
            os.replace(tmp, self.cache_path)
            STATS["cache_write"] += 1
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_BIND_RANK = {1: 0, 2: 1, 0: 2}  # GLOBAL before WEAK before LOCAL


def _load_segments(elf: ELFFile) -> list[Segment]:
    out = []
    for i in range(elf.num_segments()):
        seg = elf.get_segment(i)
        if seg["p_type"] == "PT_LOAD":
            out.append(Segment(seg["p_vaddr"], seg["p_offset"], seg["p_filesz"],
                               seg["p_memsz"], seg["p_flags"]))
    return out


def read_build_id(path: str) -> str | None:
    """The GNU build id (hex) of an ELF file; None when it has none or cannot be read."""
    try:
        with open(path, "rb") as fh:
            return _build_id(ELFFile(fh))
    except Exception:  # hostile or vanished files: no build id, like "no symbols"
        return None


def _build_id(elf: ELFFile) -> str | None:
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        for note in sec.iter_notes():  # type: ignore[attr-defined]
            if note["n_type"] == "NT_GNU_BUILD_ID" and isinstance(note["n_desc"], str):
                return note["n_desc"].lower()
    return None


def _debuglink(elf: ELFFile) -> tuple[str, int] | None:
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    data = sec.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    name = data[:end].decode("utf-8", "surrogateescape")
    if "/" in name:
        return None
    crc_at = (end + 4) & ~3
    if len(data) < crc_at + 4:
        return None
    fmt = "<I" if elf.little_endian else ">I"
    return name, struct.unpack_from(fmt, data, crc_at)[0]


def _crc32_file(f: IO[bytes]) -> int:
    f.seek(0)
    crc = 0
    while chunk := f.read(1 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc & 0xFFFFFFFF


def _has_entries(elf: ELFFile, name: str) -> bool:
    sec = elf.get_section_by_name(name)
    return sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"] > 0


def _file_has_section(path: str, name: str) -> bool:
    try:
        with open(path, "rb") as f:
            sec = ELFFile(f).get_section_by_name(name)
            return sec is not None and sec["sh_type"] != "SHT_NOBITS"
    except Exception:
        return False


def _raw_section(f: IO[bytes], offset: int, size: int, file_size: int) -> bytes:
    if offset >= file_size or size <= 0:
        return b""
    f.seek(offset)
    return f.read(min(size, file_size - offset))


def _read_symbols(elf: ELFFile, f: IO[bytes], name: str) -> list[tuple[int, int, int, str]]:
    """(value, size, bind, name) of the defined function symbols in one symbol table."""
    sec = elf.get_section_by_name(name)
    if sec is None or sec["sh_type"] == "SHT_NOBITS":
        return []
    file_size = os.fstat(f.fileno()).st_size
    link = sec["sh_link"]
    if not 0 < link < elf.num_sections():
        return []
    strsec = elf.get_section(link)
    strtab = _raw_section(f, strsec["sh_offset"], strsec["sh_size"], file_size)
    raw = _raw_section(f, sec["sh_offset"], sec["sh_size"], file_size)
    end = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:
        fmt, order = end + "IBBHQQ", (0, 1, 3, 4, 5)  # name info shndx value size
    else:
        fmt, order = end + "IIIBBH", (0, 3, 5, 1, 2)
    width = struct.calcsize(fmt)
    raw = raw[: len(raw) - len(raw) % width]
    out = []
    n_name, n_info, n_shndx, n_value, n_size = order
    for ent in struct.iter_unpack(fmt, raw):
        info = ent[n_info]
        if (info & 0xF) not in _FUNC_TYPES:
            continue
        shndx, value = ent[n_shndx], ent[n_value]
        if shndx == _SHN_UNDEF or shndx >= _SHN_LORESERVE or value == 0:
            continue
        off = ent[n_name]
        stop = strtab.find(b"\0", off)
        if off >= len(strtab) or stop == off:
            continue
        sym = strtab[off:stop if stop >= 0 else None].decode("utf-8", "surrogateescape")
        out.append((value, ent[n_size], info >> 4, sym))
    return out


_LINE_TABLES: dict[tuple[str, int, int, int], _LineTable] = {}


def _line_table(path: str) -> _LineTable:
    """One decoded DWARF reader per file for the whole process: each snapshot makes a new
    symbolizer, and decoding a compile unit's line program takes up to a second."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    table = _LINE_TABLES.get(key)
    if table is None:
        table = _LINE_TABLES[key] = _LineTable(path)
    return table


@dataclass(frozen=True)
class Inlined:
    """One function inlined at an address: its name (linkage name when DWARF has one, as
    .symtab names it) and the file:line its caller called it from."""

    name: str
    call_file: str | None
    call_line: int | None


#: DIEs whose children may hold a function's code (GCC nests namespace functions).
_SCOPES = frozenset({"DW_TAG_namespace", "DW_TAG_module"})
_Ranges = tuple[tuple[int, int], ...]


class _LineTable:
    """Address -> (file, line) from .debug_line, and address -> the chain of inlined
    functions from .debug_info, decoded one compile unit (one function) at a time."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - kept open for lazy decoding
        self._dwarf = ELFFile(self._file).get_dwarf_info()
        self._aranges = None
        try:
            self._aranges = self._dwarf.get_aranges()
        except Exception:
            self._aranges = None
        self._per_cu: dict[int, _Rows] = {}
        self._all: _Rows | None = None
        self._cu_index: tuple[list[int], list[tuple[int, int]]] | None = None
        self._functions: dict[int, tuple[list[int], list[tuple[int, int, int]]]] = {}
        self._inlines: dict[int, list[tuple[_Ranges, int, Inlined]]] = {}
        self._names: dict[int, str | None] = {}
        self._files: dict[int, _FileTable | None] = {}

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        table = None
        if self._aranges is not None:
            cu_off = self._aranges.cu_offset_at_addr(vaddr)
            if cu_off is not None:
                table = self._per_cu.get(cu_off)
                if table is None:
                    cu = self._dwarf.get_CU_at(cu_off)
                    table = self._per_cu[cu_off] = _decode([cu], self._dwarf)
        if table is None:
            if self._all is None:
                sec = self._dwarf.debug_line_sec
                if sec is None or sec.size > _MAX_LINE_SCAN:
                    return None
                self._all = _decode(list(self._dwarf.iter_CUs()), self._dwarf)
            table = self._all
        return table.lookup(vaddr)

    def inlined(self, vaddr: int) -> list[Inlined]:
        """The functions inlined at `vaddr`, innermost first ([] when none): what
        `addr2line -i` prints above the function that holds the code."""
        cu_off = self._cu_offset(vaddr)
        if cu_off is None:
            return []
        fn = self._function_at(cu_off, vaddr)
        if fn is None:
            return []
        nodes = self._inlines.get(fn)
        if nodes is None:
            cu = self._dwarf.get_CU_at(cu_off)
            nodes = self._inlines[fn] = self._inline_nodes(cu.get_DIE_from_refaddr(fn))
            _forget_dies(cu)
        hits = [(depth, inl) for ranges, depth, inl in nodes
                if any(lo <= vaddr < hi for lo, hi in ranges)]
        return [inl for _, inl in sorted(hits, key=lambda h: -h[0])]

    # -- compile units and functions -------------------------------------------------

    def _cu_offset(self, vaddr: int) -> int | None:
        if self._aranges is not None:
            off = self._aranges.cu_offset_at_addr(vaddr)
            if off is not None:
                return int(off)
        if self._cu_index is None:
            rows = []
            for cu in self._dwarf.iter_CUs():
                for lo, hi in self._ranges(cu.get_top_DIE(), cu):
                    rows.append((lo, hi, cu.cu_offset))
            rows.sort()
            self._cu_index = ([r[0] for r in rows], [(r[1], r[2]) for r in rows])
        starts, ends = self._cu_index
        i = bisect.bisect_right(starts, vaddr) - 1
        return ends[i][1] if i >= 0 and vaddr < ends[i][0] else None

    def _function_at(self, cu_off: int, vaddr: int) -> int | None:
        """The offset of the DW_TAG_subprogram whose code holds `vaddr`."""
        table = self._functions.get(cu_off)
        if table is None:
            cu = self._dwarf.get_CU_at(cu_off)
            rows: list[tuple[int, int, int]] = []
            todo = [cu.get_top_DIE()]
            while todo:
                for die in todo.pop().iter_children():
                    if die.tag == "DW_TAG_subprogram":
                        rows.extend((lo, hi, die.offset) for lo, hi in self._ranges(die, cu))
                    elif die.tag in _SCOPES:
                        todo.append(die)
            rows.sort(key=lambda r: r[0])
            table = self._functions[cu_off] = ([r[0] for r in rows], rows)
            _forget_dies(cu)
        starts, rows = table
        i = bisect.bisect_right(starts, vaddr) - 1
        return rows[i][2] if i >= 0 and vaddr < rows[i][1] else None

    def _inline_nodes(self, fn: Any) -> list[tuple[_Ranges, int, Inlined]]:
        """Every inlined call in a function's body: its ranges, nesting depth, name and
        call site."""
        cu = fn.cu
        out: list[tuple[_Ranges, int, Inlined]] = []
        todo = [(fn, 0)]
        while todo:
            parent, depth = todo.pop()
            for die in parent.iter_children():
                if die.tag == "DW_TAG_inlined_subroutine":
                    name = self._name(die)
                    ranges = self._ranges(die, cu)
                    if name is not None and ranges:
                        attrs = die.attributes
                        file = attrs.get("DW_AT_call_file")
                        line = attrs.get("DW_AT_call_line")
                        out.append((ranges, depth + 1, Inlined(
                            name, self._file_of(cu, file.value) if file else None,
                            line.value if line else None)))
                    todo.append((die, depth + 1))
                elif die.tag == "DW_TAG_lexical_block":
                    todo.append((die, depth))
        return out

    def _ranges(self, die: Any, cu: Any) -> _Ranges:
        """A DIE's code ranges: low_pc/high_pc, else DW_AT_ranges (v4 or v5 lists)."""
        attrs = die.attributes
        low = attrs.get("DW_AT_low_pc")
        high = attrs.get("DW_AT_high_pc")
        if low is not None and high is not None:
            end = high.value if high.form == "DW_FORM_addr" else low.value + high.value
            return ((low.value, end),) if end > low.value else ()
        rng = attrs.get("DW_AT_ranges")
        if rng is None:
            return ()
        lists = self._dwarf.range_lists()
        if lists is None:
            return ()
        top = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
        base = top.value if top is not None else 0
        out = []
        for ent in lists.get_range_list_at_offset(rng.value, cu=cu):
            if isinstance(ent, BaseAddressEntry):
                base = ent.base_address
            elif ent.is_absolute:
                out.append((ent.begin_offset, ent.end_offset))
            else:
                out.append((base + ent.begin_offset, base + ent.end_offset))
        return tuple((lo, hi) for lo, hi in out if hi > lo)

    def _name(self, die: Any) -> str | None:
        """The inlined function's name: the linkage name along abstract_origin and
        specification (demangled later, like .symtab's), else DW_AT_name."""
        key = die.offset
        if key in self._names:
            return self._names[key]
        name = None
        plain = None
        seen = 0
        while die is not None and seen < 8 and name is None:
            seen += 1
            attrs = die.attributes
            for attr in ("DW_AT_linkage_name", "DW_AT_MIPS_linkage_name"):
                if attr in attrs:
                    name = _text(attrs[attr].value)
                    break
            if plain is None and "DW_AT_name" in attrs:
                plain = _text(attrs["DW_AT_name"].value)
            ref = next((a for a in ("DW_AT_abstract_origin", "DW_AT_specification")
                        if a in attrs), None)
            die = die.get_DIE_from_attribute(ref) if ref is not None else None
        self._names[key] = name = name or plain
        return name

    def _file_of(self, cu: Any, index: int) -> str:
        if cu.cu_offset not in self._files:
            lp = self._dwarf.line_program_for_CU(cu)
            self._files[cu.cu_offset] = _FileTable(lp, cu) if lp is not None else None
        table = self._files[cu.cu_offset]
        return table.name(index) if table is not None else "?"


def _forget_dies(cu: Any) -> None:
    """Drop the DIEs pyelftools keeps for a compile unit once we hold what we need of
    them (~1 KiB each: +13 MiB over lua's one-unit build); it re-reads any it needs."""
    for name in ("_dielist", "_diemap"):
        cached = getattr(cu, name, None)
        if isinstance(cached, list):
            cached.clear()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Rows:
    """A line table in three flat arrays, by address: key (address*2, +1 for a row,
    +0 for the end of a sequence), file number (into `names`) and line. ~20 bytes a
    row where pyelftools' LineState objects take ~500 (a one-unit build such as
    lua's onelua.c has 137,000 rows)."""

    def __init__(self) -> None:
        self.keys: array.array[int] = array.array("Q")
        self.files: array.array[int] = array.array("I")
        self.lines: array.array[int] = array.array("I")
        self.names: list[str] = []

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.keys, vaddr * 2 + 1) - 1
        if i < 0 or not self.keys[i] & 1:
            return None
        return self.names[self.files[i]], self.lines[i]


def _decode(cus: list[Any], dwarf: Any) -> _Rows:
    """The line tables of some compile units, decoded by `_line_rows` (pyelftools'
    own decoding keeps an object per row and state: ~70 MiB for one big unit)."""
    keys: array.array[int] = array.array("Q")
    files: array.array[int] = array.array("I")
    lines: array.array[int] = array.array("I")
    out = _Rows()
    little = dwarf.config.little_endian
    for cu in cus:
        lp = dwarf.line_program_for_CU(cu)
        if lp is None:
            continue
        table = _FileTable(lp, cu)
        ids: dict[int, int] = {}
        for address, file, line in _line_rows(lp, little):
            if file < 0:
                keys.append(address * 2)
                files.append(0)
                lines.append(0)
                continue
            fid = ids.get(file)
            if fid is None:
                fid = ids[file] = len(out.names)
                out.names.append(table.name(file))
            keys.append(address * 2 + 1)
            files.append(fid)
            lines.append(min(line, 0xFFFFFFFF))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    out.keys = array.array("Q", (keys[i] for i in order))
    out.files = array.array("I", (files[i] for i in order))
    out.lines = array.array("I", (lines[i] for i in order))
    return out


def _line_rows(lp: Any, little: bool) -> Iterator[tuple[int, int, int]]:
    """(address, file, line) of each row of one line program, (address, -1, 0) at the
    end of a sequence: the DWARF 2-5 line state machine over the raw bytes (one
    operation per instruction, as on x86), header from pyelftools."""
    h = lp.header
    lp.stream.seek(lp.program_start_offset)
    data = lp.stream.read(lp.program_end_offset - lp.program_start_offset)
    min_len, base, span = h["minimum_instruction_length"], h["line_base"], h["line_range"]
    opcode_base, lengths = h["opcode_base"], list(h["standard_opcode_lengths"])
    order: Literal["little", "big"] = "little" if little else "big"
    const_add = ((255 - opcode_base) // span) * min_len if span else 0
    address, file, line = 0, 1, 1
    pos, n = 0, len(data)
    while pos < n:
        op = data[pos]
        pos += 1
        if op >= opcode_base:
            adj = op - opcode_base
            address += (adj // span) * min_len
            line += base + adj % span
            yield address, file, line
        elif op == 0:  # extended: length, sub-opcode, operands
            length, pos = uleb(data, pos)
            end = pos + length
            sub = data[pos] if pos < n else 0
            if sub == 1:  # DW_LNE_end_sequence
                yield address, -1, 0
                address, file, line = 0, 1, 1
            elif sub == 2:  # DW_LNE_set_address
                address = int.from_bytes(data[pos + 1:end], order)
            pos = end
        elif op == 1:  # DW_LNS_copy
            yield address, file, line
        elif op == 2:  # DW_LNS_advance_pc
            value, pos = uleb(data, pos)
            address += value * min_len
        elif op == 3:  # DW_LNS_advance_line
            value, pos = sleb(data, pos)
            line += value
        elif op == 4:  # DW_LNS_set_file
            file, pos = uleb(data, pos)
        elif op == 8:  # DW_LNS_const_add_pc
            address += const_add
        elif op == 9:  # DW_LNS_fixed_advance_pc
            address += int.from_bytes(data[pos:pos + 2], order)
            pos += 2
        else:  # set_column, negate_stmt, prologue_end, ...: skip their ULEB operands
            for _ in range(lengths[op - 1] if op - 1 < len(lengths) else 0):
                _, pos = uleb(data, pos)


class _FileTable:
    """A compile unit's file names (its line program's table), as absolute paths where
    DWARF allows: relative directories are relative to the unit's compilation
    directory (rustc's std is compiled in /rustc/HASH with `library/...` dirs)."""

    def __init__(self, lp: Any, cu: Any) -> None:
        header = lp.header
        self._version = header["version"]
        self._files, self._dirs = header["file_entry"], header["include_directory"]
        comp = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
        self._comp_dir = _text(comp.value) if comp is not None else ""

    def name(self, index: int) -> str:
        version, files, dirs = self._version, self._files, self._dirs
        i = index if version >= 5 else index - 1
        if not 0 <= i < len(files):
            return "?"
        entry = files[i]
        name = _text(entry.name)
        if name.startswith("/"):
            return name
        d = entry.dir_index if version >= 5 else entry.dir_index - 1
        if 0 <= d < len(dirs):
            name = os.path.join(_text(dirs[d]), name)
        return os.path.join(self._comp_dir, name) if self._comp_dir else name
