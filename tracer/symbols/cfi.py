"""Compact unwind rows from an ELF file's call-frame information (.eh_frame, .debug_frame).

Debian builds libc, libstdc++, python3.11 and most packages with -O2 and no frame
pointers: a frame-pointer walk through them skips callers or runs into data. The
compiler's CFI says, for every instruction, where the canonical frame address (CFA)
is and where the return address and the caller's rbp were saved. bpf/stacks.bpf.h
unwinds with a compact form of it, one row per change of rule, sorted by address:

    CFA = rsp + off | rbp + off,   return address at CFA-8,   rbp saved at CFA+off

which is what x86-64 compilers emit for all but a handful of functions (PLT stubs,
signal trampolines, hand-written assembly with DWARF expressions). Those get an
"unsupported" row: the BPF walk stops there and counts why, it never guesses.

The DWARF call-frame program is decoded here rather than with pyelftools, which
rejects some of libc's opcodes and takes minutes on node's 2.7 MB .eh_frame. Rows are
cached on disk by build-id, like the symbol index (tracer/symbols/elfsyms.py).
Every failure on a hostile or truncated file ends in "no rows", never an exception.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from elftools.elf.elffile import ELFFile

from tracer.files import open_trusted
from tracer.symbols.elfsyms import default_cache_dir, read_build_id
from tracer.symbols.leb128 import sleb as _sleb
from tracer.symbols.leb128 import uleb as _uleb

CACHE_VERSION = 2  # 2: the entry point's code without an FDE is the outermost frame
_MAGIC = b"NATCFI1\0"

#: bpf/natrace.h's struct unwind_row: pc (object vaddr where the row begins),
#: cfa_off, rbp_off, cfa rule, rbp rule.
ROW = struct.Struct("<IihBB")

# CFA rules (bpf/natrace.h NATRACE_CFA_*)
CFA_NONE = 0          # no unwind information covers this address
CFA_RSP = 1
CFA_RBP = 2
CFA_END = 3           # return address undefined: the outermost frame (_start, clone)
CFA_UNSUPPORTED = 4   # a DWARF expression or another register
# rbp rules (NATRACE_RBP_*)
RBP_SAME = 0          # rbp still holds the caller's value
RBP_SAVED = 1         # saved at CFA + rbp_off
RBP_LOST = 2          # recoverable only through an expression or another register

_RSP, _RBP, _RA = 7, 6, 16  # DWARF register numbers on x86-64

#: A fraction of FDEs at or above which an object counts as keeping frame pointers.
FP_THRESHOLD = 0.5


@dataclass(frozen=True)
class Row:
    pc: int
    cfa: int
    cfa_off: int
    rbp: int
    rbp_off: int


@dataclass(frozen=True)
class UnwindTable:
    """The unwind rows of one ELF file, and whether its code keeps frame pointers."""

    rows: bytes          # ROW-packed, sorted by pc, adjacent duplicates merged
    functions: int       # FDEs read
    rbp_functions: int   # FDEs whose CFA moves to rbp: functions keeping a frame pointer
    source: str          # ".eh_frame", ".debug_frame" or "" when the file has neither
    segments: tuple[tuple[int, int, int], ...] = ()   # PT_LOAD (offset, vaddr, filesz)

    def __len__(self) -> int:
        return len(self.rows) // ROW.size

    @property
    def frame_pointers(self) -> bool:
        """Does the object keep frame pointers (so a frame-pointer walk through it is right)?"""
        return self.functions > 0 and self.rbp_functions >= FP_THRESHOLD * self.functions

    def vaddr_of_offset(self, offset: int) -> int | None:
        """The object address of a file offset (a mapping's start), from PT_LOAD."""
        for seg_offset, vaddr, filesz in self.segments:
            if seg_offset <= offset < seg_offset + max(filesz, 1):
                return vaddr + offset - seg_offset
        return None

    def iter_rows(self) -> Iterator[Row]:
        for fields in ROW.iter_unpack(self.rows):
            pc, cfa_off, rbp_off, cfa, rbp = fields
            yield Row(pc, cfa, cfa_off, rbp, rbp_off)

    def find(self, vaddr: int) -> Row | None:
        """The row in force at `vaddr` (for tests and `natrace doctor`)."""
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if ROW.unpack_from(self.rows, mid * ROW.size)[0] <= vaddr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        pc, cfa_off, rbp_off, cfa, rbp = ROW.unpack_from(self.rows, (lo - 1) * ROW.size)
        return Row(pc, cfa, cfa_off, rbp, rbp_off)


EMPTY = UnwindTable(b"", 0, 0, "")


def unwind_table(path: str, *, cache_dir: str | None = None) -> UnwindTable:
    """The unwind rows of `path`, from the disk cache when its build-id was seen before.

    `cache_dir=None` uses the default cache directory, `cache_dir=""` disables the cache.
    """
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    try:
        st = os.stat(path)
    except OSError:
        return EMPTY
    build_id = read_build_id(path)
    stamp: dict[str, object] = {"v": CACHE_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "build_id": build_id}
    cache = os.path.join(cache_dir, f"{build_id}.ncfi") if cache_dir and build_id else None
    if cache:
        table = _read_cache(cache, stamp)
        if table is not None:
            return table
    table = parse_file(path)
    if cache:
        _write_cache(cache, stamp, table)
    return table


def parse_file(path: str) -> UnwindTable:
    """Rows from the file's .eh_frame, else its .debug_frame (no cache)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64":
                return EMPTY
            segments = tuple((seg["p_offset"], seg["p_vaddr"], seg["p_filesz"])
                             for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD")
            for name in (".eh_frame", ".debug_frame"):
                sec = elf.get_section_by_name(name)
                if sec is None or sec["sh_type"] == "SHT_NOBITS" or sec["sh_size"] == 0:
                    continue
                f.seek(sec["sh_offset"])
                data = f.read(sec["sh_size"])
                table = parse_section(data, sec["sh_addr"], eh=name == ".eh_frame",
                                      source=name, entry=elf.header["e_entry"])
                return dataclasses.replace(table, segments=segments)
            return dataclasses.replace(EMPTY, segments=segments)
    except Exception:  # hostile or vanished files: no rows, like "no symbols"
        return EMPTY


# -- the call-frame program ---------------------------------------------------------


class _Cie:
    __slots__ = ("code_align", "data_align", "ra_reg", "fde_enc", "has_aug", "initial",
                 "signal")

    def __init__(self) -> None:
        self.code_align = 1
        self.data_align = -8
        self.ra_reg = _RA
        self.fde_enc = 0
        self.has_aug = False
        self.initial = b""
        self.signal = False


_FIXED = {0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q", 0x00: "<Q"}


def _encoded(data: bytes, pos: int, enc: int, field_addr: int) -> tuple[int, int]:
    """A DW_EH_PE-encoded pointer at data[pos]; field_addr is its own address (pcrel)."""
    fmt = enc & 0x0F
    if fmt == 0x01:
        value, end = _uleb(data, pos)
    elif fmt == 0x09:
        value, end = _sleb(data, pos)
    else:
        code = _FIXED.get(fmt)
        if code is None:
            raise ValueError(f"pointer encoding {enc:#x}")
        (value,) = struct.unpack_from(code, data, pos)
        end = pos + struct.calcsize(code)
    if enc & 0x70 == 0x10:
        value += field_addr
    elif enc & 0x70 not in (0x00,):
        raise ValueError(f"pointer application {enc:#x}")
    return value & 0xFFFFFFFFFFFFFFFF, end


class _State:
    """The rule in force: CFA register and offset, rbp's rule, the return address's."""

    __slots__ = ("cfa_reg", "cfa_off", "cfa_expr", "rbp", "rbp_off", "ra_ok", "ra_end")

    def __init__(self) -> None:
        self.cfa_reg = _RSP
        self.cfa_off = 8
        self.cfa_expr = False
        self.rbp = RBP_SAME
        self.rbp_off = 0
        self.ra_ok = True      # return address at CFA-8
        self.ra_end = False    # undefined: the outermost frame

    def copy(self) -> _State:
        other = _State()
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    def row(self) -> tuple[int, int, int, int]:
        """(cfa rule, cfa_off, rbp rule, rbp_off) as the BPF walk reads them."""
        if self.ra_end:
            return CFA_END, 0, RBP_SAME, 0
        if self.cfa_expr or not self.ra_ok or self.cfa_reg not in (_RSP, _RBP):
            return CFA_UNSUPPORTED, 0, RBP_SAME, 0
        if not -(1 << 31) <= self.cfa_off < 1 << 31:
            return CFA_UNSUPPORTED, 0, RBP_SAME, 0
        cfa = CFA_RSP if self.cfa_reg == _RSP else CFA_RBP
        if self.rbp == RBP_SAVED and not -(1 << 15) <= self.rbp_off < 1 << 15:
            return cfa, self.cfa_off, RBP_LOST, 0
        return cfa, self.cfa_off, self.rbp, self.rbp_off if self.rbp == RBP_SAVED else 0


def _set_reg(state: _State, cie: _Cie, reg: int, rule: str, off: int = 0) -> None:
    """Apply a register rule; only rbp's and the return address's matter here."""
    if reg == _RBP:
        if rule == "offset":
            state.rbp, state.rbp_off = RBP_SAVED, off
        elif rule == "same":
            state.rbp, state.rbp_off = RBP_SAME, 0
        else:
            state.rbp, state.rbp_off = RBP_LOST, 0
    elif reg == cie.ra_reg:
        state.ra_end = rule == "undefined"
        state.ra_ok = rule == "offset" and off == -8


def _run(program: bytes, cie: _Cie, state: _State, initial: _State | None, pc: int,
         end_pc: int, rows: list[tuple[int, int, int, int, int]] | None,
         seen_rbp: list[bool]) -> None:
    """Execute a call-frame program from `pc`, appending (pc, rule...) at every change.

    `initial` is the state after the CIE's program (DW_CFA_restore goes back to it);
    rows=None runs the CIE's own program.
    """
    stack: list[_State] = []
    pos, n = 0, len(program)
    ca, da = cie.code_align, cie.data_align

    def emit() -> None:
        """Record the state in force at `pc`, before the program moves past it."""
        if rows is not None and pc < end_pc:
            rule = state.row()
            if rows and rows[-1][0] == pc:
                rows[-1] = (pc, *rule)
            elif not rows or rows[-1][1:] != rule:
                rows.append((pc, *rule))

    while pos < n:
        op = program[pos]
        pos += 1
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:      # advance_loc
            emit()
            pc += low * ca
        elif high == 0x80:    # offset
            off, pos = _uleb(program, pos)
            _set_reg(state, cie, low, "offset", off * da)
        elif high == 0xC0:    # restore
            _restore(state, initial, cie, low)
        elif op == 0x00:      # nop
            pass
        elif op == 0x01:      # set_loc
            emit()
            pc, pos = _encoded(program, pos, cie.fde_enc, 0)
        elif op in (0x02, 0x03, 0x04):   # advance_loc1/2/4
            emit()
            size = {0x02: 1, 0x03: 2, 0x04: 4}[op]
            pc += int.from_bytes(program[pos:pos + size], "little") * ca
            pos += size
        elif op == 0x05:      # offset_extended
            reg, pos = _uleb(program, pos)
            off, pos = _uleb(program, pos)
            _set_reg(state, cie, reg, "offset", off * da)
        elif op == 0x06:      # restore_extended
            reg, pos = _uleb(program, pos)
            _restore(state, initial, cie, reg)
        elif op == 0x07:      # undefined
            reg, pos = _uleb(program, pos)
            _set_reg(state, cie, reg, "undefined")
        elif op == 0x08:      # same_value
            reg, pos = _uleb(program, pos)
            _set_reg(state, cie, reg, "same")
        elif op == 0x09:      # register
            reg, pos = _uleb(program, pos)
            _, pos = _uleb(program, pos)
            _set_reg(state, cie, reg, "register")
        elif op == 0x0A:      # remember_state
            stack.append(state.copy())
        elif op == 0x0B:      # restore_state
            if stack:
                saved = stack.pop()
                for name in _State.__slots__:
                    setattr(state, name, getattr(saved, name))
        elif op == 0x0C:      # def_cfa
            state.cfa_reg, pos = _uleb(program, pos)
            state.cfa_off, pos = _uleb(program, pos)
            state.cfa_expr = False
        elif op == 0x0D:      # def_cfa_register
            state.cfa_reg, pos = _uleb(program, pos)
            state.cfa_expr = False
        elif op == 0x0E:      # def_cfa_offset
            state.cfa_off, pos = _uleb(program, pos)
        elif op == 0x0F:      # def_cfa_expression
            size, pos = _uleb(program, pos)
            pos += size
            state.cfa_expr = True
        elif op in (0x10, 0x16):   # expression, val_expression
            reg, pos = _uleb(program, pos)
            size, pos = _uleb(program, pos)
            pos += size
            _set_reg(state, cie, reg, "expression")
        elif op == 0x11:      # offset_extended_sf
            reg, pos = _uleb(program, pos)
            off, pos = _sleb(program, pos)
            _set_reg(state, cie, reg, "offset", off * da)
        elif op == 0x12:      # def_cfa_sf
            state.cfa_reg, pos = _uleb(program, pos)
            off, pos = _sleb(program, pos)
            state.cfa_off = off * da
            state.cfa_expr = False
        elif op == 0x13:      # def_cfa_offset_sf
            off, pos = _sleb(program, pos)
            state.cfa_off = off * da
        elif op in (0x14, 0x15):   # val_offset(_sf): the register's value is CFA+off
            reg, pos = _uleb(program, pos)
            _, pos = (_uleb if op == 0x14 else _sleb)(program, pos)
            _set_reg(state, cie, reg, "value")
        elif op == 0x2E:      # GNU_args_size
            _, pos = _uleb(program, pos)
        elif op == 0x2F:      # GNU_negative_offset_extended
            reg, pos = _uleb(program, pos)
            off, pos = _uleb(program, pos)
            _set_reg(state, cie, reg, "offset", -off * da)
        else:
            raise ValueError(f"call-frame opcode {op:#x}")
        if state.cfa_reg == _RBP and not state.cfa_expr:
            seen_rbp[0] = True
    emit()


def _restore(state: _State, initial: _State | None, cie: _Cie, reg: int) -> None:
    base = initial or _State()
    if reg == _RBP:
        state.rbp, state.rbp_off = base.rbp, base.rbp_off
    elif reg == cie.ra_reg:
        state.ra_ok, state.ra_end = base.ra_ok, base.ra_end


def _parse_cie(data: bytes, pos: int, end: int, eh: bool, sec_addr: int) -> _Cie:
    cie = _Cie()
    version = data[pos]
    pos += 1
    aug_end = data.index(b"\0", pos)
    aug = data[pos:aug_end].decode("ascii", "replace")
    pos = aug_end + 1
    if "eh" in aug:
        pos += 8
    if not eh and version >= 4:
        pos += 2  # address_size, segment_selector_size
    cie.code_align, pos = _uleb(data, pos)
    cie.data_align, pos = _sleb(data, pos)
    if version == 1:
        cie.ra_reg = data[pos]
        pos += 1
    else:
        cie.ra_reg, pos = _uleb(data, pos)
    if not eh:
        cie.fde_enc = 0x00
    if aug.startswith("z"):
        cie.has_aug = True
        size, pos = _uleb(data, pos)
        aug_data_end = pos + size
        for ch in aug[1:]:
            if ch == "R":
                cie.fde_enc = data[pos]
                pos += 1
            elif ch == "L":
                pos += 1
            elif ch == "P":
                enc = data[pos]
                _, pos = _encoded(data, pos + 1, enc & 0x7F, sec_addr + pos + 1)
            elif ch == "S":
                cie.signal = True
        pos = aug_data_end
    cie.initial = data[pos:end]
    return cie


def parse_section(data: bytes, sec_addr: int, *, eh: bool, source: str,
                  entry: int = 0) -> UnwindTable:
    """Rows of one .eh_frame (eh=True) or .debug_frame section loaded at `sec_addr`.
    `entry`: the ELF entry point, whose code is the outermost frame even without an
    FDE (ld.so's _start, which calls _dl_start and, as _dl_start_user, _dl_init: every
    stack of a program's start-up and of its libraries' constructors ends there)."""
    cies: dict[int, tuple[_Cie, _State]] = {}
    fdes: list[tuple[int, list[tuple[int, int, int, int, int]]]] = []
    functions = rbp_functions = 0
    pos, n = 0, len(data)
    while pos + 4 <= n:
        start = pos
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if length == 0:
            if eh:
                break  # terminator
            continue
        wide = length == 0xFFFFFFFF
        if wide:
            (length,) = struct.unpack_from("<Q", data, pos)
            pos += 8
        end = pos + length
        if end > n:
            break
        id_pos = pos
        (cie_id,) = struct.unpack_from("<Q" if wide else "<I", data, pos)
        pos += 8 if wide else 4
        is_cie = cie_id == 0 if eh else cie_id in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)
        try:
            if is_cie:
                cie = _parse_cie(data, pos, end, eh, sec_addr)
                initial = _State()
                _run(cie.initial, cie, initial, None, 0, 0, None, [False])
                cies[start] = (cie, initial)
            else:
                cie_at = id_pos - cie_id if eh else cie_id
                if cie_at not in cies:
                    pos = end
                    continue
                cie, initial = cies[cie_at]
                enc = cie.fde_enc
                pc_begin, pos = _encoded(data, pos, enc, sec_addr + pos)
                pc_range, pos = _encoded(data, pos, enc & 0x0F, 0)
                if cie.has_aug:
                    size, pos = _uleb(data, pos)
                    pos += size
                if pc_begin and pc_range and pc_begin + pc_range < 1 << 32:
                    rows: list[tuple[int, int, int, int, int]] = []
                    state = initial.copy()
                    seen = [state.cfa_reg == _RBP]
                    rows.append((pc_begin, *state.row()))
                    _run(data[pos:end], cie, state, initial, pc_begin, pc_begin + pc_range,
                         rows, seen)
                    rows.append((pc_begin + pc_range, CFA_NONE, 0, RBP_SAME, 0))
                    fdes.append((pc_begin, rows))
                    functions += 1
                    rbp_functions += seen[0]
        except (IndexError, ValueError, struct.error):
            pass  # one broken entry loses its function, not the table
        pos = end
    if entry and not any(pc <= entry < rows[-1][0] for pc, rows in fdes):
        after = min((pc for pc, _ in fdes if pc > entry), default=entry + _ENTRY_CODE)
        fdes.append((entry, [(entry, CFA_END, 0, RBP_SAME, 0),
                             (min(after, entry + _ENTRY_CODE), CFA_NONE, 0, RBP_SAME, 0)]))
    return UnwindTable(_merge(fdes), functions, rbp_functions, source)


#: How far an entry point's code without an FDE is taken to reach (ld.so's is 0x5a
#: bytes on x86-64), unless a function's FDE starts sooner.
_ENTRY_CODE = 256


def _merge(fdes: list[tuple[int, list[tuple[int, int, int, int, int]]]]) -> bytes:
    """One sorted row list: an FDE starting where the previous one ends replaces its end
    marker; a row equal to the one before it is dropped."""
    fdes.sort(key=lambda f: f[0])
    out: list[tuple[int, int, int, int, int]] = []
    for _, rows in fdes:
        for row in rows:
            if out and out[-1][0] >= row[0]:
                if out[-1][1] != CFA_NONE and out[-1][0] > row[0]:
                    continue  # overlapping FDEs: keep the first one's rows
                out.pop()
            if out and out[-1][1:] == row[1:]:
                continue
            out.append(row)
    packed = bytearray(ROW.size * len(out))
    for i, (pc, cfa, cfa_off, rbp, rbp_off) in enumerate(out):
        ROW.pack_into(packed, i * ROW.size, pc, cfa_off, rbp_off, cfa, rbp)
    return bytes(packed)


# -- disk cache ---------------------------------------------------------------------


def _read_cache(path: str, stamp: dict[str, object]) -> UnwindTable | None:
    """The rows kept at `path`, trusted only when nobody else could have written them
    (they go into the kernel's stack walk); None for a stale, torn or foreign entry."""
    c = open_trusted(path, "rb")
    if c is None:
        return None
    try:
        with c:
            data = c.read()
        if data[:8] != _MAGIC:
            return None
        (hlen,) = struct.unpack_from("<I", data, 8)
        header = json.loads(data[12:12 + hlen])
        if header.get("stamp") != stamp:
            return None
        rows = data[12 + hlen:]
        if len(rows) != header["rows"] * ROW.size:
            return None
        return UnwindTable(rows, header["functions"], header["rbp_functions"],
                           header["source"], tuple(tuple(s) for s in header["segments"]))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _write_cache(path: str, stamp: dict[str, object], table: UnwindTable) -> None:
    header = json.dumps({"stamp": stamp, "rows": len(table), "functions": table.functions,
                         "rbp_functions": table.rbp_functions,
                         "source": table.source, "segments": table.segments}).encode()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as c:
            c.write(_MAGIC + struct.pack("<I", len(header)) + header + table.rows)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
