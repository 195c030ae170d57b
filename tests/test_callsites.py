"""CallSites: one memo for every probe set of an address space, keyed by stack map."""

from __future__ import annotations

from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile
from symfixtures import build, fake_maps

from tracer.engine.callsites import CallSites
from tracer.symbols.callee import CalleeResolver
from tracer.symbols.procmaps import MapsHistory
from tracer.symbols.symbolizer import Symbolizer, jit_note


class Probes:
    """A probe set's stack map: its own ids for its own stacks."""

    def __init__(self, stacks: dict[int, tuple[int, ...]]) -> None:
        self.stacks = stacks
        self.reads = 0

    def stack(self, stack_id: int) -> tuple[int, ...]:
        self.reads += 1
        return self.stacks[stack_id]


def test_the_same_id_in_two_stack_maps_is_two_call_sites(tmp_path: Path) -> None:
    perf = tmp_path / "perf-42.map"
    perf.write_text("7f0000200100 80 JS:alloc_side /app/a.js:1:1\n"
                    "7f0000200200 80 JS:triage_side /app/b.js:2:2\n")
    maps = MapsHistory.from_lines(["7f0000200000-7f0000210000 r-xp 00000000 00:00 0\n"])
    sites = CallSites(Symbolizer(maps, cache_dir=str(tmp_path), perf_map=str(perf)))
    alloc, triage = Probes({5: (0x7F0000200110,)}), Probes({5: (0x7F0000200210,)})
    assert sites.call_site(5, alloc.stack).function == "JS:alloc_side /app/a.js:1:1"
    assert sites.call_site(5, triage.stack).function == "JS:triage_side /app/b.js:2:2"
    # memoized per map: asking again reads neither map
    assert sites.call_site(5, alloc.stack).function == "JS:alloc_side /app/a.js:1:1"
    assert sites.call_site(5, triage.stack).function == "JS:triage_side /app/b.js:2:2"
    assert (alloc.reads, triage.reads) == (1, 1)


def test_stacks_end_at_jit_code_no_perf_map_names(tmp_path: Path) -> None:
    """Anonymous executable memory is JIT code, but without a perf map nothing says
    which: the stack ends there (issue 16: frames are code named as such), and the
    report's note says how to name it."""
    maps = MapsHistory.from_lines(["7f0000200000-7f0000210000 r-xp 00000000 00:00 0\n",
                                   "7f0000300000-7f0000310000 r-xp 00000000 00:00 0\n"])
    symbolizer = Symbolizer(maps, 4242, cache_dir=str(tmp_path),
                            perf_map=str(tmp_path / "perf-4242.map"))
    sites = CallSites(symbolizer)
    frames = sites.frames((0x7F0000200110, 0x7F0000300210, 0x7F0000300310))
    # frame 0, the pc, is executing: unnamed JIT code
    assert [(f.address, f.module, f.module_class) for f in frames] == [
        (0x7F0000200110, "[jit]", "js")]
    # ... also where V8 has flipped the page to rw- since (W^X) before the maps were read:
    # a node page fault's pc labelled [anon] read as a frame in data (seen in test_handles)
    flipped = CallSites(Symbolizer(MapsHistory.from_lines(
        ["7f0000200000-7f0000210000 rw-p 00000000 00:00 0\n"]), 4242,
        cache_dir=str(tmp_path), perf_map=str(tmp_path / "perf-4242.map")))
    assert [(f.module, f.module_class) for f in flipped.frames((0x7F0000200110,))] == [
        ("[jit]", "js")]
    assert sites.unnamed_jit == {0x7F0000300210}
    assert jit_note(symbolizer, len(sites.unnamed_jit)) == [
        f"stacks end at 1 return address in JIT code without names (anonymous executable "
        f"memory), as {tmp_path}/perf-4242.map does not exist; start node with "
        "--perf-basic-prof (a JVM with perf-map-agent) to name them and see their callers"]
    # once node writes its perf map, the same frames are named JIT code, kept
    (tmp_path / "perf-4242.map").write_text("7f0000300200 80 JS:handler /app/a.js:1:1\n")
    named = CallSites(Symbolizer(maps, 4242, cache_dir=str(tmp_path),
                                 perf_map=str(tmp_path / "perf-4242.map")))
    assert [(f.module, f.symbol) for f in named.frames((0x7F0000200110, 0x7F0000300210))] == [
        ("[jit]", None), ("[jit]", "JS:handler /app/a.js:1:1")]


def test_the_api_called_is_named_from_maps_read_while_ldso_mapped_the_file() -> None:
    """A launched target stops when it maps code, and natrace reads its maps then: ld.so
    has mapped the text, and the read-only segment before the data still covers the
    data pages, at another file offset. The GOT slot of `call strdup@plt` read there had
    no address, so the API went unnamed for good (PQexec, in the e2e recording)."""
    lib, base = build().libsyms, 0x7F0000000000
    with open(lib, "rb") as fh:
        elf = ELFFile(fh)
        beta = elf.get_section_by_name(".symtab").get_symbol_by_name("syms_beta")[0]
        text = elf.get_section_by_name(".text")
        start = beta["st_value"] - text["sh_addr"]
        code = text.data()[start:start + beta["st_size"]]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    call = next(i for i in md.disasm(code, beta["st_value"]) if i.mnemonic == "call")
    ret = base + call.address + call.size
    full = fake_maps(lib, base)
    *before, data = full  # the data segment, and the read-only one that covered it
    covering = before[-1].replace(before[-1].split()[0].split("-")[1],
                                  data.split()[0].split("-")[1], 1)
    for lines in (full, [*before[:-1], covering]):
        resolver = CalleeResolver(Symbolizer(MapsHistory.from_lines(lines)))
        assert resolver.callee(ret) == "strdup", lines
