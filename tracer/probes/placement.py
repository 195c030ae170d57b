"""Where inside a function to put its entry uprobe.

A uprobe on an instruction the kernel emulates (push, jumps) costs ~1.3 µs per hit
on our machines; one that must be single-stepped out of line (test, mov) ~5.7 µs.
For entry-only probes we may move past a leading NULL test of the first argument
(free's `test %rdi,%rdi; je`) to the first emulated instruction, as long as every
call that matters still passes there. Functions that also get a uretprobe keep
offset 0: the return probe must see the return address on top of the stack.

The analysis is kept on disk by the file's build-id (like the symbol and CFI caches),
so a warm attach neither disassembles nor imports capstone. A uprobe off an
instruction boundary would corrupt the target: an entry is trusted only when natrace's
user owns it and nobody else can write it, and only for an offset inside the function.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

from tracer.files import open_trusted, write_private
from tracer.symbols.elfsyms import default_cache_dir, read_build_id

if TYPE_CHECKING:
    import capstone

CACHE_VERSION = 1
_MAX_SCAN = 12  # instructions from the entry


def probe_offset(path: str, file_offset: int, size: int, *,
                 cache_dir: str | None = None) -> int:
    """entry_offset() of the function of `size` bytes at `file_offset` in `path`, for a
    function whose NULL first argument needs no recording; from the cache when this
    build of the file was analysed before. `cache_dir=""` disables the cache."""
    cache_dir = os.path.join(default_cache_dir(), "placement") if cache_dir is None \
        else cache_dir
    build_id = read_build_id(path) if cache_dir else None
    cache = os.path.join(cache_dir, f"{build_id}.json") if build_id else None
    known = _read_cache(cache) if cache else {}
    key = f"{file_offset:x}:{size:x}"
    offset = known.get(key)
    if isinstance(offset, int) and 0 <= offset < max(size, 1):
        return offset
    with open(path, "rb") as fh:
        fh.seek(file_offset)
        offset = entry_offset(fh.read(size), ignores_null_first_arg=True)
    if cache:
        with contextlib.suppress(OSError, ValueError):
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)
            write_private(cache, json.dumps({"v": CACHE_VERSION,
                                             "offsets": {**known, key: offset}}))
    return offset


def _read_cache(path: str) -> dict[str, object]:
    """The offsets kept for one build-id; {} for a missing, torn or untrusted entry."""
    fh = open_trusted(path)
    if fh is None:
        return {}
    with fh:
        try:
            data = json.load(fh)
        except ValueError:
            return {}
    if not isinstance(data, dict) or data.get("v") != CACHE_VERSION or \
            not isinstance(data.get("offsets"), dict):
        return {}
    return data["offsets"]


def _decoder() -> capstone.Cs:
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def _emulated(insn: capstone.CsInsn) -> bool:
    """Instructions x86 uprobes execute without single-stepping."""
    import capstone
    from capstone import x86_const

    if insn.id == x86_const.X86_INS_PUSH and insn.op_count(capstone.CS_OP_REG) == 1:
        return True
    return bool(insn.group(capstone.CS_GRP_JUMP) and insn.op_count(capstone.CS_OP_IMM) == 1)


def _is_null_test_of_rdi(insn: capstone.CsInsn) -> bool:
    import capstone
    from capstone import x86_const

    if insn.id != x86_const.X86_INS_TEST or len(insn.operands) != 2:
        return False
    a, b = insn.operands
    return a.type == b.type == capstone.CS_OP_REG and a.reg == b.reg == x86_const.X86_REG_RDI


def _branch_targets(md: capstone.Cs, code: bytes, base: int) -> set[int]:
    import capstone

    targets: set[int] = set()
    for insn in md.disasm(code, base):
        if insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL):
            for op in insn.operands:
                if op.type == capstone.CS_OP_IMM:
                    targets.add(op.imm)
    return targets


def entry_offset(code: bytes, ignores_null_first_arg: bool) -> int:
    """Offset within `code` (a whole function) for a cheap entry probe; 0 when unsure.

    Skips only a `test %rdi,%rdi` and the conditional jump that follows it (when a
    NULL first argument needs no recording), then stops at the first emulated
    instruction, provided no branch in the function lands inside the skipped bytes.
    """
    from capstone import x86_const

    md = _decoder()
    insns = []
    for insn in md.disasm(code[: 15 * _MAX_SCAN], 0):
        insns.append(insn)
        if len(insns) >= _MAX_SCAN:
            break
    if not insns or _emulated(insns[0]) or not ignores_null_first_arg:
        return 0
    if len(insns) < 3 or not _is_null_test_of_rdi(insns[0]):
        return 0
    jcc = insns[1]
    if jcc.id not in (x86_const.X86_INS_JE,) or not _emulated(jcc):
        return 0
    # The je itself is emulated, and every call, NULL or not, passes it: rdi is intact.
    candidate = jcc.address
    if any(0 < t <= candidate for t in _branch_targets(md, code, 0)):
        return 0
    return candidate
