"""Putting back the frames a frame-pointer walk skips at a syscall or fault.

A user stack captured in the kernel starts at the instruction inside libc (a syscall
wrapper, __lll_lock_wait, memset) and follows rbp. libc keeps no frame pointers, so
the walk's next frame is the caller of the first function *with* one: the function
that called into libc is missing. Two ways to get it back:

- `splice_caller`: the probe read *sp, the return address, which is right when the
  libc function pushed nothing (mmap, munmap, brk wrappers).
- `window_callers`: the probe kept the words above sp; the return addresses among
  them (a call instruction just before, in an executable file) up to the first one
  outside libc are the libc frames and their caller (pthread_mutex_lock ->
  __lll_lock_wait pushes four words first). A stale return address left in an
  uninitialised slot of a libc frame can be taken for the caller: rare, and it points
  into the same thread's recent callers.
"""

from __future__ import annotations

from collections.abc import Sequence

from tracer.symbols.attribution import RUNTIME_MODULES, module_class
from tracer.symbols.procmaps import MapsHistory


def splice_caller(stack: tuple[int, ...], caller: int) -> tuple[int, ...]:
    """`stack` with the return address read at *sp put back after frame 0."""
    if stack and caller and (len(stack) < 2 or stack[1] != caller):
        stack = (stack[0], caller, *stack[1:])
    return stack


class CallChecker:
    """Is an address a return address: just after a call instruction in a mapped file?"""

    def __init__(self, maps: MapsHistory) -> None:
        self.maps = maps
        self._memo: dict[int, str | None] = {}

    def module_class_of_return(self, addr: int) -> str | None:
        """The module class of the file `addr` returns into, or None if no call precedes it."""
        if addr not in self._memo:
            self._memo[addr] = self._check(addr)
        return self._memo[addr]

    def _check(self, addr: int) -> str | None:
        if addr < 4096 or addr >= 1 << 47:
            return None
        m = self.maps.find(addr)
        if m is None or not m.executable or not m.file_backed or addr - m.start < 7:
            return None
        path = self.maps.module_path(m)
        if path is None:
            return None
        try:
            with open(path, "rb") as fh:
                fh.seek(m.file_offset(addr) - 7)
                code = fh.read(7)
        except OSError:
            return None
        return module_class(m.clean_path) if len(code) == 7 and _ends_in_call(code) else None


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


def window_callers(stack: tuple[int, ...], window: Sequence[int],
                   checker: CallChecker) -> tuple[int, ...]:
    """`stack` with the skipped libc frames and their caller put back after frame 0.

    Only when frame 0 is in libc or libstdc++ (code without frame pointers): a frame
    that has one was walked correctly.
    """
    if not stack or not window:
        return stack
    m = checker.maps.find(stack[0])
    if m is None or module_class(m.clean_path) not in RUNTIME_MODULES:
        return stack
    found: list[int] = []
    for word in window:
        cls = checker.module_class_of_return(word)
        if cls is None:
            continue
        found.append(word)
        if cls not in RUNTIME_MODULES:
            break
    else:
        return stack  # no caller outside libc within the window: leave the walk as is
    rest = stack[1:]
    if rest and rest[0] == found[-1]:
        return (stack[0], *found[:-1], *rest)
    return (stack[0], *found, *rest)
