"""Where the memory syscalls can be seen without raw_syscalls: the syscall instructions
of glibc's wrappers and of its dynamic loader's.

Any program on a syscall tracepoint (raw_syscalls or syscalls:sys_enter_mmap alike)
turns on the kernel's traced-syscall work for every task: each syscall of the traced
process then runs natrace's programs, its futex calls included, and on x86-64 since
Linux 6.11 so does every traced malloc's return (a uretprobe returns through a
syscall), ~250 ns each here. When nothing else in the session needs raw_syscalls
(no triage, no child stopped at its birth), bpf/alloc.bpf.c takes mmap, munmap,
mremap, mprotect and brk from a uprobe on the instruction just after each
`mov $NR, %eax; syscall` in libc.so.6 and ld.so: there rax holds what the syscall
returned, every argument register still holds its argument (the kernel keeps them),
and pc, sp and rbp are the syscall's own, so the event and its stack are the ones
sys_exit would have seen. glibc calls the same code from malloc (sysmalloc's mmap,
sbrk's brk), pthread_create (stacks, their mprotect) and dlopen (the loader's own copy).

Not seen there: a direct syscall(SYS_mmap, ...) (tcmalloc makes them), a static
program's or musl's, another allocator library's: `find` then answers None and the
session keeps raw_syscalls, exactly as before. Nor a call whose return a signal handler
interrupts and leaves by longjmp (sys_exit ran before the handler; this probe after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from tracer.probes.allocators import inode_of
from tracer.probes.target import elf_interpreter, is_static_executable

#: The syscalls bpf/alloc.bpf.c accounts, x86-64 numbers -> its uprobe program.
SYSCALLS = {9: "site_mmap", 11: "site_munmap", 25: "site_mremap", 12: "site_brk",
            10: "site_mprotect"}
_NAMES = {nr: program.removeprefix("site_") for nr, program in SYSCALLS.items()}
#: mov $NR,%eax; syscall, for each NR above
_SITE = re.compile(rb"\xb8([" + b"".join(re.escape(bytes([nr])) for nr in SYSCALLS)
                   + rb"])\x00\x00\x00\x0f\x05")
_SITE_LEN = 7
_LIBC = re.compile(r"(^|/)libc\.so\.6$")
_LOADER = re.compile(r"(^|/)ld-linux[^/]*\.so[.\d]*$")
# allocators that may map memory with syscall(2) or code of their own
_OTHER_ALLOCATOR = re.compile(r"(^|/)lib(jemalloc|tcmalloc|mimalloc)[^/]*\.so")
_PF_X = 1


@dataclass(frozen=True)
class SyscallSite:
    """Where one memory syscall is probed, as ELF virtual addresses: `pc`, the instruction
    after its `syscall` (what sys_exit sees as the user pc, frame 0 of its stack), and
    `vaddr`, the probe: the conditional jump on the result when only instructions that
    keep rax, rsp, rbp and the syscall's argument registers come between (a jump is
    emulated by the kernel, ~1.3 us a hit here; other instructions are single-stepped
    out of line, ~5.7 us), else `pc` itself."""

    path: str
    syscall: str  # mmap, munmap, mremap, mprotect, brk
    vaddr: int
    program: str  # its uprobe's BPF program
    pc: int


# Instructions glibc's wrappers run between the syscall and the test of its result:
# (encoding prefix, length, the syscalls whose argument registers it keeps).
_KEEPING = (
    (b"\x48\x3d", 6, frozenset(_NAMES.values())),  # cmp $imm32, %rax
    (b"\x48\x39\xf8", 3, frozenset(_NAMES.values())),  # cmp %rdi, %rax
    (b"\x48\x89\x02", 3, frozenset(_NAMES.values())),  # mov %rax, (%rdx)
    (b"\x48\x8b\x15", 7, frozenset({"brk", "munmap"})),  # mov disp32(%rip), %rdx
)
_STEPS = 4


def _probe_at(code: bytes, at: int, syscall: str) -> int:
    """Offset in `code` of the conditional jump testing the result of the syscall whose
    next instruction is at `at`; `at` itself when none follows within a few kept
    instructions."""
    pos = at
    for _ in range(_STEPS):
        op = code[pos:pos + 2]
        if len(op) == 2 and (0x70 <= op[0] <= 0x7F or (op[0] == 0x0F and 0x80 <= op[1] <= 0x8F)):
            return pos
        step = next((n for prefix, n, keeps in _KEEPING
                     if code.startswith(prefix, pos) and syscall in keeps), None)
        if step is None:
            return at
        pos += step
    return at


def sites_in(path: str) -> list[SyscallSite]:
    """Every `mov $NR, %eax; syscall` of the five syscalls in a file's executable
    segments. glibc's wrappers set the number right before the instruction."""
    sites = []
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            segments = [(seg["p_vaddr"], seg.data()) for seg in elf.iter_segments()
                        if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & _PF_X]
    except (OSError, ELFError, ValueError):
        return []
    for vaddr, code in segments:
        for m in _SITE.finditer(code):
            nr = m.group(1)[0]
            at = m.start() + _SITE_LEN
            probe = _probe_at(code, at, _NAMES[nr])
            sites.append(SyscallSite(path, _NAMES[nr], vaddr + probe, SYSCALLS[nr],
                                     vaddr + at))
    return sites


def pc_of(sites: list[SyscallSite]) -> dict[int, int]:
    """Probe address -> syscall pc offsets, keyed by the probe's offset in its page
    (what a runtime address keeps of a file's virtual address): turns frame 0 of a
    site event's stack back into sys_exit's. A page offset two sites share with other
    distances is left out (its events keep the probe's pc)."""
    out: dict[int, int] = {}
    clash = set()
    for s in sites:
        key, delta = s.vaddr & 0xFFF, s.vaddr - s.pc
        if out.get(key, delta) != delta:
            clash.add(key)
        out[key] = delta
    return {k: d for k, d in out.items() if k not in clash and d}


def find(files: list[str], executable: str | None) -> list[SyscallSite] | None:
    """The sites standing for raw_syscalls in a process mapping `files`: in its glibc
    (one of each syscall) and its loader; None when they cannot (a static or musl
    program, no glibc, another allocator library, a wrapper not found)."""
    if executable is None or is_static_executable(executable):
        return None
    if any(_OTHER_ALLOCATOR.search(f) for f in files):
        return None
    libc = next((f for f in files if _LIBC.search(f)), None)
    interp = elf_interpreter(executable)
    loaders = {f for f in files if _LOADER.search(f)}
    if interp is not None:
        loaders.add(interp)
    if libc is None or not loaders:
        return None
    found = sites_in(libc)
    if sorted(s.syscall for s in found) != sorted(_NAMES.values()):
        return None  # not glibc's one wrapper each
    inodes = {inode_of(libc)}
    for loader in sorted(loaders):
        if inode_of(loader) in inodes:
            continue
        inodes.add(inode_of(loader))
        mine = sites_in(loader)
        if not {"mmap", "munmap"} <= {s.syscall for s in mine}:
            return None  # it maps libraries some other way
        found += mine
    return found
