"""Which function a call instruction called: the library API a call site went through.

A creation stack shows where the program called into a library but not always which
function it called: PQexec tail-calls a static function, so the outermost libpq frame
has no name, and PQsetdbLogin returns straight to the program. The program's own call
instruction says: `call rel32` to a PLT stub that jumps through a GOT slot, or
`call *slot(%rip)` (-fno-plt); the dynamic relocation of that slot names the function.
A direct `call rel32` to a function of the same file is named by the symbolizer.
"""

from __future__ import annotations

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from tracer.symbols.procmaps import Mapping
from tracer.symbols.symbolizer import Symbolizer

_STUB_BYTES = 16  # a PLT entry: [endbr64] [bnd] jmp *slot(%rip)


class CalleeResolver:
    def __init__(self, symbolizer: Symbolizer) -> None:
        self.symbolizer = symbolizer
        self.maps = symbolizer.maps
        self._slots: dict[str, dict[int, str]] = {}  # path -> GOT slot vaddr -> symbol
        self._memo: dict[int, str | None] = {}

    def callee(self, return_address: int) -> str | None:
        """The function called by the call instruction before `return_address`, or None
        when it cannot be told (an indirect call through a register, unreadable code)."""
        if return_address not in self._memo:
            try:
                self._memo[return_address] = self._resolve(return_address)
            except (OSError, ELFError, ValueError):
                self._memo[return_address] = None
        return self._memo[return_address]

    def _resolve(self, ret: int) -> str | None:
        code = self._read(ret - 6, 6)
        if code is None:
            return None
        if code[1] == 0xE8:  # call rel32
            target = (ret + int.from_bytes(code[2:], "little", signed=True)) & (2**64 - 1)
            stub = self._read(target, _STUB_BYTES)
            slot = _jump_slot(stub, target) if stub is not None else None
            if slot is None:  # a direct call: name the function itself
                return self.symbolizer.frame(target, return_address=False).symbol
            return self._slot_symbol(slot, target)
        if code[:2] == b"\xff\x15":  # call *disp32(%rip)
            return self._slot_symbol(ret + int.from_bytes(code[2:], "little", signed=True),
                                     ret - 6)
        return None

    def _read(self, addr: int, n: int) -> bytes | None:
        """Bytes of the file behind the executable mapping holding `addr`."""
        m = self.maps.find(addr)
        path = self._path(m)
        if m is None or path is None or not m.executable:
            return None
        with open(path, "rb") as fh:
            fh.seek(m.file_offset(addr))
            data = fh.read(n)
        return data if len(data) == n else None

    def _path(self, m: Mapping | None) -> str | None:
        return self.maps.module_path(m) if m is not None and m.file_backed else None

    def _slot_symbol(self, slot: int, user: int) -> str | None:
        """The symbol whose dynamic relocation fills the GOT slot at runtime address `slot`,
        addressed rip-relative by the instruction at `user`, so in the same file: the
        slot's link-time address comes from the code's mapping, not the slot's own. Maps
        read while ld.so was mapping the file (a code stop at its text) show the data
        pages still covered by the read-only segment mapped before them, at the wrong
        file offset; the slot then had no address, and the answer was kept for good."""
        m = self.maps.find(user)
        path = self._path(m)
        if m is None or path is None:
            return None
        elf = self.symbolizer.elf_for(m)
        if elf is None:
            return None
        at = elf.file_offset_to_vaddr(m.file_offset(user))
        if at is None:
            return None
        vaddr = slot - (user - at)
        if path not in self._slots:
            self._slots[path] = _relocated_slots(path)
        return self._slots[path].get(vaddr)


def _jump_slot(stub: bytes, stub_addr: int) -> int | None:
    """The GOT slot a PLT stub jumps through (`ff 25 disp32`), or None for other code."""
    i = stub.find(b"\xff\x25")
    if i < 0 or i + 6 > len(stub) or i > 6:  # at most endbr64 (4) + bnd (1) before it
        return None
    return stub_addr + i + 6 + int.from_bytes(stub[i + 2:i + 6], "little", signed=True)


def _relocated_slots(path: str) -> dict[int, str]:
    """GOT slot vaddr -> symbol name, from the file's dynamic relocations."""
    out: dict[int, str] = {}
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        dynsym = elf.get_section_by_name(".dynsym")
        if dynsym is None:
            return out
        for section in elf.iter_sections():
            if not isinstance(section, RelocationSection) or \
                    section.name not in (".rela.plt", ".rela.dyn"):
                continue
            for rel in section.iter_relocations():
                index = rel["r_info_sym"]
                if index:
                    name = dynsym.get_symbol(index).name  # type: ignore[attr-defined]
                    if name:
                        out[rel["r_offset"]] = name.split("@", 1)[0]
    return out
