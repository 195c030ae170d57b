"""Symbolizer: addresses -> exact names, from fixtures built here and a live process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from symfixtures import build, fake_maps, source_line

from tracer.symbols.elfsyms import ElfSymbols
from tracer.symbols.perfmap import PerfMap
from tracer.symbols.procmaps import MapsHistory
from tracer.symbols.symbolizer import Symbolizer

BASE = 0x7F1234500000


def vaddr_of(path: Path, name: str) -> int:
    addr = ElfSymbols(str(path), cache_dir="").address_of(name)
    assert addr is not None, name
    return addr


def symbolizer_for(path: Path, tmp_path: Path, **kw: object) -> Symbolizer:
    maps = MapsHistory.from_lines(fake_maps(path, BASE))
    return Symbolizer(maps, cache_dir=str(tmp_path), **kw)  # type: ignore[arg-type]


def test_full_library_names_and_lines(tmp_path: Path) -> None:
    lib = build().libsyms
    s = symbolizer_for(lib, tmp_path, lines=True)
    alpha = vaddr_of(lib, "syms_alpha")
    f = s.frame(BASE + alpha, return_address=False)
    assert (f.symbol, f.symbol_offset, f.module, f.module_offset) == ("syms_alpha", 0, str(lib),
                                                                      alpha)
    assert f.module_class == "libsyms.so"
    assert f.file is not None and f.file.endswith("libsyms.c")
    assert f.line == source_line("alpha")
    assert f.label() == f"syms_alpha (libsyms.c:{source_line('alpha')})"
    # As a return address, alpha+0 belongs to the call before it: the previous function.
    before = s.frame(BASE + alpha)
    assert before.symbol != "syms_alpha" and before.symbol_offset > 0
    inside = s.frame(BASE + alpha + 4)
    assert (inside.symbol, inside.symbol_offset) == ("syms_alpha", 4)


def test_stripped_library_static_function_is_module_offset(tmp_path: Path) -> None:
    b = build()
    s = symbolizer_for(b.stripped, tmp_path)
    beta = vaddr_of(b.libsyms, "syms_beta")
    hidden = vaddr_of(b.libsyms, "syms_hidden_helper")
    assert s.frame(BASE + beta + 2).label() == "syms_beta+0x2"
    f = s.frame(BASE + hidden + 2)
    assert f.symbol is None
    assert f.label() == f"libsyms-stripped.so+{hidden + 2:#x}"


def test_split_debug_file_names_static_functions(tmp_path: Path) -> None:
    b = build()
    maps = MapsHistory.from_lines(fake_maps(b.split, BASE))
    s = Symbolizer(maps, cache_dir=str(tmp_path), debug_dirs=[str(b.debug_root)], lines=True)
    hidden = vaddr_of(b.libsyms, "syms_hidden_helper")
    f = s.frame(BASE + hidden, return_address=False)
    assert f.symbol == "syms_hidden_helper" and f.line == source_line("hidden")


def test_cxx_names_are_demangled(tmp_path: Path) -> None:
    lib = build().cxx
    s = symbolizer_for(lib, tmp_path)
    grow = vaddr_of(lib, "_ZN5vault6Widget4growEi")
    twice = vaddr_of(lib, "_ZN5vault5twiceIiEET_S1_")
    assert s.frame(BASE + grow + 1).symbol == "vault::Widget::grow(int)"
    assert s.frame(BASE + twice, return_address=False).label() == "int vault::twice<int>(int)"
    raw = Symbolizer(s.maps, cache_dir=str(tmp_path), demangle_names=False)
    assert raw.frame(BASE + grow + 1).symbol == "_ZN5vault6Widget4growEi"


def test_memoized(tmp_path: Path) -> None:
    lib = build().libsyms
    s = symbolizer_for(lib, tmp_path)
    a = BASE + vaddr_of(lib, "syms_gamma") + 1
    first = s.frame(a)
    assert s.frame(a) is first
    assert s.frames([a, a]) == [first, first]
    assert len(s._elves) == 1


def test_jit_and_unknown_addresses(tmp_path: Path) -> None:
    perf = tmp_path / "perf-42.map"
    perf.write_text("7f0000200100 80 LazyCompile:*handler /app/server.js:10:3\n"
                    "9f0000000000 40 JS:~gone /app/a.js:1:1\n"
                    "7f0000300100 20 JS:~flipped /app/b.js:2:2\n")
    lines = ["7f0000200000-7f0000210000 rwxp 00000000 00:00 0\n",
             "7f0000300000-7f0000310000 rw-p 00000000 00:00 0\n",  # V8 code page, W^X
             "7ffd10000000-7ffd10002000 r-xp 00000000 00:00 0 [vdso]\n"]
    s = Symbolizer(MapsHistory.from_lines(lines), cache_dir=str(tmp_path), perf_map=str(perf))
    f = s.frame(0x7F0000200110)
    assert (f.module, f.module_class, f.symbol, f.symbol_offset) == (
        "[jit]", "js", "LazyCompile:*handler /app/server.js:10:3", 0x10)
    unnamed = s.frame(0x7F0000208000)
    assert (unnamed.module, unnamed.module_class, unnamed.symbol) == ("[jit]", "js", None)
    assert s.frame(0x9F0000000010).symbol == "JS:~gone /app/a.js:1:1"  # no mapping left
    flipped = s.frame(0x7F0000300104)
    assert (flipped.module_class, flipped.symbol) == ("js", "JS:~flipped /app/b.js:2:2")
    data = s.frame(0x7F0000308000)  # writable anonymous memory the perf map does not name
    assert (data.module, data.module_class) == ("[anon]", "anon")
    vdso = s.frame(0x7FFD10000100)
    assert vdso.module == "[vdso]" and vdso.module_class == "vdso"
    assert vdso.label() == "[vdso]+0x100"
    unknown = s.frame(0x10)
    assert unknown.module == "" and unknown.label() == "[unknown 0x10]"
    # A perf map that is empty so far still marks anonymous executable memory as JIT...
    plain = Symbolizer(MapsHistory.from_lines(lines), cache_dir=str(tmp_path),
                       perf_map=PerfMap(str(tmp_path / "none.map")))
    assert plain.frame(0x7F0000200110).module_class == "js"
    # ...but without any perf map, it is just anonymous.
    nomap = Symbolizer(MapsHistory.from_lines(lines), cache_dir=str(tmp_path))
    assert nomap.frame(0x7F0000200110).module == "[anon]"


def _read_truth(proc: subprocess.Popen[str]) -> dict[str, int]:
    assert proc.stdout is not None
    out: dict[str, int] = {}
    for line in proc.stdout:
        if line.strip() == "ready":
            return out
        name, addr = line.split()
        out[name] = int(addr, 16)
    raise AssertionError(f"host died: {proc.stderr.read() if proc.stderr else ''}")


def test_live_process_after_dlclose_and_exit(tmp_path: Path) -> None:
    b = build()
    proc = subprocess.Popen([str(b.host), str(b.addon)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        truth = _read_truth(proc)
        maps = MapsHistory(proc.pid)
        assert maps.find(truth["vault_open"]) is not None
        sym = Symbolizer(maps, proc.pid, cache_dir=str(tmp_path))
        assert sym.pid == proc.pid
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("close\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        maps.refresh()
        # dlclose unmapped the addon: only our history knows it now.
        assert all(m.clean_path != str(b.addon) for m in maps.mappings)
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert maps.refresh() is False

    f = sym.frame(truth["vault_open"], return_address=False)
    assert (f.symbol, f.symbol_offset, f.module, f.module_class) == (
        "vault_open", 0, str(b.addon), "addon:vault")
    assert sym.frame(truth["vault_leaf"] + 1).label() == "vault_leaf+0x1"
    ret = sym.frame(truth["vault_caller_ret"])
    assert ret.symbol == "vault_caller" and ret.module_class == "addon:vault"
    assert ret.symbol_offset == truth["vault_caller_ret"] - truth["vault_caller"]
    host = sym.frame(truth["host_marker"], return_address=False)
    assert (host.symbol, host.module, host.module_class) == ("host_marker", str(b.host), "host")
    # Real libc frames resolve too (debug symbols if installed, else .dynsym).
    libc = [m for m in maps.history if "libc.so" in m.path and m.executable]
    assert libc
    f = sym.frame(libc[0].start + 0x100)
    assert f.module_class == "libc" and f.module.endswith("libc.so.6")


def test_preload_indexes_mapped_files(tmp_path: Path) -> None:
    b = build()
    proc = subprocess.Popen([str(b.host), str(b.addon)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_truth(proc)
        sym = Symbolizer(MapsHistory(proc.pid), proc.pid, cache_dir=str(tmp_path))
        assert sym.preload() >= 3  # host, vault.node, libc, ld.so
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("ret", [True, False])
def test_frames_accepts_any_iterable(tmp_path: Path, ret: bool) -> None:
    lib = build().libsyms
    s = symbolizer_for(lib, tmp_path)
    a = BASE + vaddr_of(lib, "syms_gamma") + 3
    assert [f.symbol for f in s.frames(iter([a, a]), return_addresses=ret)] == ["syms_gamma"] * 2
