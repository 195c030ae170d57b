"""Inlined functions expanded from DWARF: each is a frame (and a call site) of its own,
named and placed as `addr2line -i` places them, in reports, recordings and exports.

Fixture: tests/fixtures/src/nofp/nesting.cpp built -O2 -g without frame pointers, its
leaking functions inlined into their callers (heaptrack's asdf/split/main case)."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import SRC, build_nofp
from test_exports import compile_profile_proto

from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.recording import Recording, RecordingWriter
from tracer.symbols.elfsyms import ElfSymbols

NATRACE = str(Path(sys.executable).with_name("natrace"))
SOURCE = SRC / "nofp" / "nesting.cpp"

#: function -> (bytes, blocks, inlined?), from the fixture's own comment
TRUTH = {"asdf": (1_400, 14, True), "vault::Pool::grab()": (144, 6, True),
         "fill(vault::Pool&)": (900, 3, False), "remember": (160, 5, True)}


def nesting() -> Path:
    return build_nofp().nesting


def line_of(text: str) -> int:
    return next(i for i, src in enumerate(SOURCE.read_text().splitlines(), 1) if text in src)


def addr2line(vaddr: int) -> list[tuple[str, str]]:
    """`addr2line -i -f -C` at the call instruction: (function, file:line) pairs,
    innermost first."""
    out = subprocess.run(["addr2line", "-i", "-f", "-C", "-e", str(nesting()), hex(vaddr - 1)],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    return [(out[i], re.sub(r" \(discriminator \d+\)$", "", out[i + 1]))
            for i in range(0, len(out), 2)]


def same_address(site: dict[str, Any]) -> list[dict[str, Any]]:
    """Every frame of the charged frame's address: the functions inlined there (the
    runtime's ones before it included) out to the one holding the code."""
    stack, start = site["stack"], site["charge_index"]
    while start > 0 and stack[start - 1]["inlined"] and \
            stack[start - 1]["address"] == stack[start]["address"]:
        start -= 1
    end = next(i for i in range(start, len(stack)) if not stack[i]["inlined"])
    return stack[start:end + 1]


def test_the_inline_chain_of_an_address_from_dwarf() -> None:
    """ElfSymbols reads the chain straight from .debug_info: names as .symtab would
    have them (linkage names where DWARF has them), call sites from DW_AT_call_*."""
    elf = ElfSymbols(str(nesting()), cache_dir="")
    path = str(SOURCE)
    asdf_call = next(a for a in _calls(nesting(), "main") if elf.inlined_at(a - 1))
    chain = elf.inlined_at(asdf_call - 1)
    assert [(i.name, i.call_file, i.call_line) for i in chain] == [
        ("asdf", path, line_of("sink = asdf(100)")), ("split", path, line_of("split(14);"))]
    assert elf.line_for(asdf_call - 1) == (path, line_of("return std::malloc(n);"))
    grab = elf.inlined_at(_calls(nesting(), "fill(vault::Pool&)")[0] - 1)
    assert [(i.name, i.call_line) for i in grab] == [
        ("_ZN5vault4Pool4grabEv", line_of("sink = pool.grab();"))]


def _calls(exe: Path, function: str) -> list[int]:
    """Return addresses of the call instructions in one function (objdump)."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(exe)], check=True,
                          capture_output=True, text=True).stdout
    body = text.split(f"<{function}>:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    addrs = [int(line.split(":", 1)[0], 16) for line in body if line.strip()]
    return [addrs[i + 1] for i, line in enumerate(body) if "\tcall " in line and i + 1 < len(addrs)]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    tmp = tmp_path_factory.mktemp("inlined")
    out, rec = tmp / "r.json", tmp / "r.natrace"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--record", str(rec),
                           "--", str(nesting())], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    text = subprocess.run([NATRACE, "report", str(rec)], capture_output=True, text=True,
                          timeout=120)
    assert text.returncode == 0, text.stderr
    return json.loads(out.read_text()), rec, text.stdout


def program_sites(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["function"]: s for s in report["sites"] if s["module"] == str(nesting())}


@pytest.mark.bpf
def test_each_inlined_function_is_a_row_of_its_own(
        traced: tuple[dict[str, Any], Path, str]) -> None:
    report, _, text = traced
    assert report["version"] == 4
    sites = program_sites(report)
    assert {name: (s["bytes"], s["blocks"], s["stack"][s["charge_index"]]["inlined"])
            for name, s in sites.items()} == TRUTH, [s["label"] for s in report["sites"]]
    asdf = same_address(sites["asdf"])
    assert asdf[0] is sites["asdf"]["stack"][sites["asdf"]["charge_index"]]
    assert [(f["symbol"], f["inlined"]) for f in asdf] == [
        ("asdf", True), ("split", True), ("main", False)]
    assert len({(f["address"], f["module_offset"]) for f in asdf}) == 1
    assert sites["asdf"]["label"] == f"asdf (nesting.cpp:{line_of('return std::malloc(n);')}, " \
        "inlined)"
    # the text report: one row each, the inlined frames marked
    for name, row in (("asdf", "asdf (nesting.cpp:"), ("vault::Pool::grab()",
                                                       "vault::Pool::grab (nesting.cpp:")):
        line = next(t for t in text.splitlines() if row in t and "malloc" in t)
        assert line.split()[:2] == [f"{TRUTH[name][0]:,}", str(TRUTH[name][1])], line
        assert line.endswith(", inlined)"), line
    assert "<- split (nesting.cpp:" in text
    # libstdc++'s allocate(), inlined from its header: the runtime's frame, passed over
    remember = sites["remember"]
    std = remember["stack"][remember["charge_index"] - 1]
    assert (std["inlined"], std["module_class"], std["module"]) == (
        True, "libstdc++", str(nesting()))
    assert remember["via"] == std["symbol"] and "__new_allocator<long>::allocate" in std["symbol"]
    modules = {m["module"]: m["bytes"] for m in report["modules"]}
    assert modules["nesting"] == sum(b for b, _, _ in TRUTH.values())


@pytest.mark.bpf
def test_file_and_line_match_addr2line(traced: tuple[dict[str, Any], Path, str]) -> None:
    """Every frame of the address the leak came from, against binutils' addr2line -i.
    binutils 2.40 names the innermost function of a DWARF 5 range list after the
    function holding it (`main` for asdf); its file:line and the outer names agree."""
    report, _, _ = traced
    for name, site in program_sites(report).items():
        ours = same_address(site)
        theirs = addr2line(ours[0]["module_offset"])
        assert [f"{f['file']}:{f['line']}" for f in ours] == [w for _, w in theirs], name
        assert [f["symbol"] for f in ours][1:] == [n for n, _ in theirs][1:], name
        assert site["stack"][site["charge_index"]]["symbol"] == name


@pytest.mark.bpf
def test_recordings_and_exports_keep_the_inlined_frames(
        traced: tuple[dict[str, Any], Path, str], tmp_path: Path) -> None:
    report, rec, _ = traced
    replay = json.loads(subprocess.run([NATRACE, "report", str(rec), "--json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert replay["sites"] == report["sites"]
    folded = tmp_path / "f.folded"
    subprocess.run([NATRACE, "flamegraph", str(rec), "-o", str(folded)], check=True,
                   capture_output=True)
    lines = {stack: int(n) for stack, _, n in
             (ln.rpartition(" ") for ln in folded.read_text().splitlines())}
    asdf = [n for stack, n in lines.items() if stack.endswith(
        "main [nesting];split [nesting];asdf [nesting]")]
    assert asdf == [1_400]
    # pprof: one location per address, the inlined functions as its first lines
    pb = compile_profile_proto(tmp_path)
    pprof = tmp_path / "p.pb.gz"
    subprocess.run([NATRACE, "flamegraph", str(rec), "-o", str(pprof)], check=True,
                   capture_output=True)
    prof = pb.Profile()
    prof.ParseFromString(gzip.decompress(pprof.read_bytes()))
    st = list(prof.string_table)
    functions = {f.id: st[f.name] for f in prof.function}
    locations = {loc.id: loc for loc in prof.location}
    leaves = {tuple(functions[ln.function_id] for ln in locations[s.location_id[0]].line):
              s.value[0] for s in prof.sample}
    assert leaves[("asdf", "split", "main")] == 1_400


def test_a_recording_keeps_inlined_frames_and_older_schemas_read(tmp_path: Path) -> None:
    """Schema 4 stores `frames.inlined` and a frame's own class (std::map code inlined
    into the program is libstdc++'s; the module stays the program's); a schema 3 file
    (the columns dropped) reads its frames as not inlined, of their module's class."""
    new = Frame(0x7F00, "/usr/lib/libstdc++.so.6", 0xA958C, "operator new", 0x1C, None, None,
                "libstdc++")
    std = Frame(0x1080, "/opt/app", 0x1080, "std::map<int, int>::operator[](int const&)", 0,
                "/usr/include/c++/12/bits/stl_map.h", 511, "libstdc++", inlined=True)
    inner = Frame(0x1080, "/opt/app", 0x1080, "asdf", 0, "/src/a.cpp", 13, "app", inlined=True)
    outer = Frame(0x1080, "/opt/app", 0x1080, "main", 0x15, "/src/a.cpp", 32, "app")
    snap = Snapshot(pid=1, command="x", taken_at=0.0, duration=1.0,
                    sites=[Site("malloc", [new, std, inner, outer], 1400, 14, 14, 1400)])
    path = tmp_path / "r.natrace"
    with RecordingWriter(str(path), {}) as writer:
        writer.add(snap)
    with Recording(str(path)) as rec:
        assert rec.snapshot().sites[0].frames == [new, std, inner, outer]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT class FROM modules WHERE path = '/opt/app'").fetchall() == \
            [("app",)]
        db.execute("ALTER TABLE frames DROP COLUMN inlined")
        db.execute("ALTER TABLE frames DROP COLUMN class")
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        db.commit()
    with Recording(str(path)) as rec:
        frames = rec.snapshot().sites[0].frames
    assert [(f.symbol, f.inlined, f.module_class) for f in frames][1:] == [
        (std.symbol, False, "app"), ("asdf", False, "app"), ("main", False, "app")]
