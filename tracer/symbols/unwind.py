"""Checking the frames of an unwound stack, and the one frame `--unwind fp` misses at a
syscall.

bpf/stacks.bpf.h walks with CFI rows and frame pointers and ends where it cannot
follow. A frame-pointer step through code that uses rbp as a plain register can still
land on a word that is not a return address; `ReturnChecker.true_frames` cuts the
stack before the first such frame: every frame after the first must lie in executable
code, just after a call instruction (in a file), or in JIT code (anonymous executable
memory, named by a perf map). Nothing that fails is printed as a frame.

`splice_caller` is for `--unwind fp` only: a stack captured inside a libc syscall
wrapper (which pushes nothing) follows rbp past the wrapper's caller; the probe read
*sp, that return address, and it is put back.
"""

from __future__ import annotations

from tracer.symbols.procmaps import MapsHistory


def splice_caller(stack: tuple[int, ...], caller: int) -> tuple[int, ...]:
    """`stack` with the return address read at *sp put back after frame 0."""
    if stack and caller and (len(stack) < 2 or stack[1] != caller):
        stack = (stack[0], caller, *stack[1:])
    return stack


class ReturnChecker:
    """Is an address a return address: just after a call instruction in mapped code?"""

    def __init__(self, maps: MapsHistory) -> None:
        self.maps = maps
        self._memo: dict[int, bool] = {}

    def true_frames(self, stack: tuple[int, ...]) -> tuple[int, ...]:
        """The stack up to (not including) its first frame that is no return address;
        frame 0 is the probe's own pc, always kept."""
        for i in range(1, len(stack)):
            if not self.is_return_address(stack[i]):
                return stack[:i]
        return stack

    def is_return_address(self, addr: int) -> bool:
        if addr not in self._memo:
            self._memo[addr] = self._check(addr)
        return self._memo[addr]

    def _check(self, addr: int) -> bool:
        if addr < 4096 or addr >= 1 << 47:
            return False
        m = self.maps.find(addr)
        if m is None or not m.executable:
            return False
        if not m.file_backed:
            return m.anon and not m.special  # JIT code: no file to read the call from
        if addr - m.start < 7:
            return False
        path = self.maps.module_path(m)
        if path is None:
            return True  # a file we cannot open: its mapping is all we can check
        try:
            with open(path, "rb") as fh:
                fh.seek(m.file_offset(addr) - 7)
                code = fh.read(7)
        except OSError:
            return True
        return len(code) == 7 and _ends_in_call(code)


def _ends_in_call(code: bytes) -> bool:
    """Do the 7 bytes before a return address end with a call instruction?"""
    if code[2] == 0xE8:  # call rel32
        return True
    for p in range(7 - 2, -1, -1):  # call r/m64: [REX] FF /2, ModRM, [SIB], [disp]
        if code[p] != 0xFF or p + 1 >= 7:
            continue
        modrm = code[p + 1]
        if (modrm >> 3) & 7 != 2:
            continue
        mod, rm = modrm >> 6, modrm & 7
        sib = 1 if mod != 3 and rm == 4 else 0
        disp = {0: 4 if rm == 5 else 0, 1: 1, 2: 4, 3: 0}[mod]
        if sib and mod == 0 and code[p + 2] & 7 == 5 if p + 2 < 7 else False:
            disp = 4  # SIB with no base register
        if p + 2 + sib + disp == 7:
            return True
    return False
