"""Raw user-space addresses of one traced process -> named `Frame`s.

Works from our own `MapsHistory` and our own indexed ELF files, not from the live
process, so stacks can still be named after a library was dlclose'd or the process
exited. Every address is symbolized at most once (memoized); every file is indexed at
most once per symbolizer (and once per build-id across runs, through the disk cache).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

from tracer.model.frames import Frame
from tracer.symbols.attribution import (
    LANGUAGE_RUNTIME_MODULES,
    RUNTIME_MODULES,
    RUST_STD_CLASS,
    SAMPLER_CLASS,
    module_class,
)
from tracer.symbols.demangle import demangle
from tracer.symbols.elfsyms import ElfSymbols
from tracer.symbols.perfmap import PerfMap, perf_map_path
from tracer.symbols.procmaps import Mapping, MapsHistory

JIT_MODULE = "[jit]"
ANON_MODULE = "[anon]"


def jit_note(symbolizer: Symbolizer, unnamed: int) -> list[str]:
    """The hint a report needs when stacks ended at `unnamed` return addresses in
    anonymous executable memory — JIT code nobody named — as the process writes no perf
    map."""
    if not unnamed or symbolizer.perf_map is not None:
        return []
    where = symbolizer._perf_path or f"/tmp/perf-{symbolizer.pid}.map"
    plural = "es" if unnamed != 1 else ""
    return [f"stacks end at {unnamed:,} return address{plural} in JIT code without names "
            f"(anonymous executable memory), as {where} does not exist; start node with "
            "--perf-basic-prof (a JVM with perf-map-agent) to name them and see their "
            "callers"]


#: Modules whose frames get no file:line: the runtime's frames are only ever `via`, never
#: charged, and decoding libc6-dbg's line programs for the libc frames CFI stacks reach
#: cost ~15 s of CPU per process (a budgeted agent window ended on it).
_NO_LINES = RUNTIME_MODULES | LANGUAGE_RUNTIME_MODULES
#: ... nor inlined frames: natrace's own sampler is the allocator's front, always passed.
_NO_INLINES = _NO_LINES | {SAMPLER_CLASS}

#: Sources whose inlined functions are the language runtime's code compiled into the
#: program (std::map's node allocation inside cache_insert, glibc's fortify wrappers,
#: Rust's alloc/core/std and the crates std vendors): their frames get the runtime's
#: class, so charging passes over them as it does over the runtime's own frames.
_RUNTIME_SOURCES: tuple[tuple[str, str], ...] = (
    ("/usr/include/c++/", "libstdc++"),
    ("/usr/include/x86_64-linux-gnu/bits/", "libc"),
    ("/usr/include/bits/", "libc"),
    ("/rustc/", RUST_STD_CLASS),
    ("/rust/deps/", RUST_STD_CLASS),
)


def _inlined_class(file: str | None, cls: str) -> str:
    for prefix, runtime in _RUNTIME_SOURCES:
        if file is not None and file.startswith(prefix):
            return runtime
    return cls


class Symbolizer:
    """Names addresses of the process described by `maps`.

    `return_addresses=True` (the default) treats addresses as return addresses: the
    symbol and source line are looked up at addr-1, the call instruction, so a call at
    the very end of a function is not charged to the next one. `symbol_offset` is still
    reported from the address itself, as perf and gdb do.
    `lines=True` adds DWARF file:line where a file has .debug_line (slower), and
    expands a stack's addresses into the functions inlined there (`frames`).
    """

    def __init__(self, maps: MapsHistory, pid: int | None = None,
                 cache_dir: str | None = None, *, debug_dirs: Sequence[str] | None = None,
                 perf_map: str | PerfMap | None = None, lines: bool = False,
                 demangle_names: bool = True) -> None:
        self.maps = maps
        self.pid = pid if pid is not None else maps.pid
        self.cache_dir = cache_dir
        self.debug_dirs = debug_dirs
        self.lines = lines
        self.demangle_names = demangle_names
        self._elves: dict[tuple[str, int, str], ElfSymbols | None] = {}
        self._memo: dict[tuple[int, bool], Frame] = {}
        self._chains: dict[tuple[int, bool], tuple[Frame, ...]] = {}
        self._perf: PerfMap | None = perf_map if isinstance(perf_map, PerfMap) else None
        self._perf_path: str | None = perf_map if isinstance(perf_map, str) else None
        if self._perf is None and self._perf_path is None and self.pid is not None:
            self._perf_path = perf_map_path(self.pid)

    # -- public ---------------------------------------------------------------------

    def frame(self, addr: int, return_address: bool = True) -> Frame:
        """The named frame for one address (memoized once named: a JIT frame's perf-map
        line or a library's mapping may arrive after a first look)."""
        key = (addr, return_address)
        got = self._memo.get(key)
        if got is None:
            got = self._symbolize(addr, return_address)
            if got.symbol is not None:
                self._memo[key] = got
        return got

    def frames(self, addrs: Iterable[int], return_addresses: bool = True) -> list[Frame]:
        """Frames for a stack, innermost first; with `lines`, each function inlined at
        an address is a frame of its own before the one holding the code (see `chain`)."""
        return [f for a in addrs for f in self.chain(a, return_addresses)]

    def chain(self, addr: int, return_address: bool = True) -> tuple[Frame, ...]:
        """The frames one address stands for, innermost first, as `addr2line -i` names
        them: each inlined function (marked `inlined`) at its own file:line, then the
        function holding the code at the line it called the outermost of them from.
        Just `frame(addr)` without `lines`, DWARF, or inlining there; runtime modules
        are never expanded (their DWARF is the costly libc6-dbg kind)."""
        key = (addr, return_address)
        got = self._chains.get(key)
        if got is None:
            frame = self.frame(addr, return_address)
            got = self._expand(frame, return_address)
            if frame.symbol is not None:
                self._chains[key] = got
        return got

    def preload(self) -> int:
        """Index every executable file mapped now; returns how many were opened.

        Call this while the process is alive when it may exit before its stacks are
        named: files reached through /proc/PID/root or map_files vanish with it.
        """
        n = 0
        for m in self.maps.mappings:
            if m.file_backed and m.executable and self.elf_for(m) is not None:
                n += 1
        return n

    def elf_for(self, mapping: Mapping) -> ElfSymbols | None:
        """The indexed ELF file behind a mapping (shared by all mappings of the file)."""
        key = (mapping.clean_path, mapping.inode, mapping.dev)
        if key in self._elves:
            return self._elves[key]
        elf = None
        path = self.maps.module_path(mapping)
        if path is not None:
            elf = ElfSymbols(path, debug_dirs=self.debug_dirs, cache_dir=self.cache_dir,
                             logical_path=mapping.clean_path)
            if elf.error is not None and not elf.segments:
                elf = None
        self._elves[key] = elf
        return elf

    @property
    def perf_map(self) -> PerfMap | None:
        if self._perf is None and self._perf_path is not None and os.path.exists(
                self._perf_path):
            self._perf = PerfMap(self._perf_path)
        return self._perf

    # -- work -----------------------------------------------------------------------

    def _expand(self, frame: Frame, return_address: bool) -> tuple[Frame, ...]:
        if not self.lines or frame.file is None or frame.module_class in _NO_INLINES:
            return (frame,)
        m = self.maps.find(frame.address)
        elf = self.elf_for(m) if m is not None and m.file_backed else None
        if elf is None:
            return (frame,)
        vaddr = frame.module_offset
        inlined = elf.inlined_at(vaddr - 1 if return_address and vaddr > 0 else vaddr)
        if not inlined:
            return (frame,)
        out = []
        file: str | None = frame.file
        line = frame.line
        for inl in inlined:
            name = demangle(inl.name) if self.demangle_names else inl.name
            out.append(dataclasses.replace(
                frame, symbol=name, symbol_offset=0, file=file, line=line, inlined=True,
                module_class=_inlined_class(file, frame.module_class)))
            file, line = inl.call_file, inl.call_line
        out.append(dataclasses.replace(frame, file=file, line=line))
        return tuple(out)

    def _symbolize(self, addr: int, return_address: bool) -> Frame:
        m = self.maps.find(addr)
        if m is None and self.maps.refresh():
            m = self.maps.find(addr)
        # V8 flips its code pages between rw- and r-x (W^X), so any anonymous memory can
        # hold JIT code: ask the perf map before calling it plain anonymous memory.
        if m is None or (m.anon and not m.vdso):
            jit = self._jit_frame(addr, m)
            if jit is not None:
                return jit
        if m is None:
            return Frame(addr)
        if not m.file_backed:
            name = m.path or ANON_MODULE
            return Frame(addr, name, addr - m.start, module_class=module_class(name))
        return self._file_frame(addr, m, return_address)

    def _jit_frame(self, addr: int, m: Mapping | None) -> Frame | None:
        pm = self.perf_map
        hit = None
        if pm is not None:
            hit = pm.lookup(addr)
            if hit is None and pm.refresh():
                hit = pm.lookup(addr)
        if hit is not None:
            name, off = hit
            return Frame(addr, JIT_MODULE, addr - m.start if m else 0, name, off,
                         module_class="js")
        if m is not None and m.executable and not m.special and pm is not None:
            # Executable anonymous memory in a process that writes a perf map is JIT code
            # whose line we have not seen (yet).
            return Frame(addr, JIT_MODULE, addr - m.start, module_class="js")
        return None

    def _file_frame(self, addr: int, m: Mapping, return_address: bool) -> Frame:
        path = m.clean_path
        cls = module_class(path)
        offset = m.file_offset(addr)
        elf = self.elf_for(m)
        vaddr = elf.file_offset_to_vaddr(offset) if elf is not None else None
        if elf is None or vaddr is None:
            return Frame(addr, path, offset, module_class=cls)
        probe = vaddr - 1 if return_address and vaddr > 0 else vaddr
        symbol, sym_off = None, 0
        hit = elf.lookup(probe)
        if hit is not None:
            symbol, sym_off = hit
            sym_off += vaddr - probe
            if self.demangle_names:
                symbol = demangle(symbol)
        file, line = None, None
        if self.lines and cls not in _NO_LINES and elf.has_debug_line:
            where = elf.line_for(probe)
            if where is not None:
                file, line = where
        return Frame(addr, path, vaddr, symbol, sym_off, file, line, cls)
