"""CallSites: one memo for every probe set of an address space, keyed by stack map."""

from __future__ import annotations

from pathlib import Path

from tracer.engine.callsites import CallSites
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
