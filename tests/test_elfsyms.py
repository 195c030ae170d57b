"""ElfSymbols: symbol sources, lookups, line info, the disk cache, hostile files."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symfixtures import build, source_line

from tracer.symbols.demangle import demangle, demangle_many
from tracer.symbols.elfsyms import STATS, ElfSymbols

NODE = "/usr/bin/node"
EXPORTED = ("syms_alpha", "syms_beta", "syms_gamma")


def syms(path: Path, **kw: object) -> ElfSymbols:
    kw.setdefault("cache_dir", "")
    return ElfSymbols(str(path), **kw)  # type: ignore[arg-type]


def truth() -> dict[str, int]:
    full = syms(build().libsyms)
    return {n: a for a, _, n in full.symbols()}


def test_full_symtab_lookup_and_sizes() -> None:
    e = syms(build().libsyms)
    assert e.source == "symtab" and e.error is None and e.build_id
    t = truth()
    for name in EXPORTED + ("syms_hidden_helper",):
        assert e.lookup(t[name]) == (name, 0)
        assert e.lookup(t[name] + 3) == (name, 3)
    sizes = {n: s for _, s, n in e.symbols()}
    end = t["syms_alpha"] + sizes["syms_alpha"]
    hit = e.lookup(end)
    assert hit is None or hit[0] != "syms_alpha"
    assert e.lookup(0) is None


def test_stripped_keeps_exports_only() -> None:
    e = syms(build().stripped)
    assert e.source == "dynsym"
    t = truth()
    for name in EXPORTED:
        assert e.lookup(t[name] + 1) == (name, 1)
    assert e.lookup(t["syms_hidden_helper"]) is None


def test_debug_file_by_build_id_in_configurable_root() -> None:
    b = build()
    without = syms(b.split, debug_dirs=[])
    assert without.source == "dynsym"
    e = syms(b.split, debug_dirs=[str(b.debug_root)])
    assert e.source == "debug" and e.debug_file is not None
    assert e.debug_file.startswith(str(b.debug_root))
    t = truth()
    assert e.lookup(t["syms_hidden_helper"] + 2) == ("syms_hidden_helper", 2)
    assert e.line_for(t["syms_alpha"]) == (str(build().libsyms.parent.parent.parent / "src" /
                                              "symbols" / "libsyms.c"), source_line("alpha"))


def test_debug_file_by_debuglink() -> None:
    b = build()
    e = syms(b.linked, debug_dirs=[])
    assert e.build_id is None
    assert e.source == "debug" and e.debug_file == str(b.linked_debug)
    assert e.lookup(truth()["syms_hidden_helper"]) == ("syms_hidden_helper", 0)


def test_debuglink_crc_mismatch_is_rejected(tmp_path: Path) -> None:
    b = build()
    shutil.copy(b.linked, tmp_path / "liblinked.so")
    (tmp_path / ".debug").mkdir()
    shutil.copy(b.libsyms, tmp_path / ".debug" / b.linked_debug.name)  # wrong file
    e = syms(tmp_path / "liblinked.so", debug_dirs=[])
    assert e.source == "dynsym"


def test_line_info_is_lazy_and_exact() -> None:
    e = syms(build().libsyms)
    assert e.has_debug_line and e._lines is None
    t = truth()
    for tag, name in (("alpha", "syms_alpha"), ("beta", "syms_beta"),
                      ("hidden", "syms_hidden_helper")):
        where = e.line_for(t[name])
        assert where is not None
        assert where[0].endswith("libsyms.c") and where[1] == source_line(tag)
    assert e._lines is not None
    assert not syms(build().addon).has_debug_line


def test_file_offset_to_vaddr_uses_pt_load() -> None:
    e = syms(build().libsyms)
    text = next(s for s in e.segments if s.flags & 1)
    assert e.file_offset_to_vaddr(text.offset + 5) == text.vaddr + 5
    assert e.file_offset_to_vaddr(1 << 40) is None


def test_cxx_names_demangle() -> None:
    e = syms(build().cxx)
    names = {n for _, _, n in e.symbols()}
    assert "_ZN5vault6Widget4growEi" in names
    assert demangle("_ZN5vault6Widget4growEi") == "vault::Widget::grow(int)"
    assert demangle("_ZN5vault5twiceIiEET_S1_") == "int vault::twice<int>(int)"
    assert demangle("_ZN5vault11make_vectorEi") == "vault::make_vector(int)"
    assert demangle("_Znwm") == "operator new(unsigned long)"
    assert demangle("_ZdlPv@@GLIBCXX_3.4") == "operator delete(void*)@@GLIBCXX_3.4"
    assert demangle("_Zgarbage!") == "_Zgarbage!"
    assert demangle("malloc") == "malloc"
    assert demangle_many(["_Znwm", "x"]) == {"_Znwm": "operator new(unsigned long)", "x": "x"}


def test_cxxfilt_fallback_batches() -> None:
    from tracer.symbols import demangle as d
    out = d._cxxfilt(["_ZN5vault6Widget4growEi", "plain", "_Zbad!"])
    assert out == {"_ZN5vault6Widget4growEi": "vault::Widget::grow(int)", "plain": "plain",
                   "_Zbad!": "_Zbad!"}


def test_disk_cache_is_used_and_invalidated(tmp_path: Path) -> None:
    lib = tmp_path / "libsyms.so"
    shutil.copy(build().libsyms, lib)
    cache = str(tmp_path / "cache")
    alpha = truth()["syms_alpha"]
    before = STATS.copy()
    first = ElfSymbols(str(lib), cache_dir=cache)
    assert not first.from_cache and first.cache_path and os.path.exists(first.cache_path)
    assert STATS["indexed"] == before["indexed"] + 1
    second = ElfSymbols(str(lib), cache_dir=cache)
    assert second.from_cache and STATS["indexed"] == before["indexed"] + 1
    assert list(second.symbols()) == list(first.symbols())
    assert second.has_debug_line and second.line_for(alpha) is not None
    # Same build-id, different contents on disk: must be re-indexed, never served stale.
    st = os.stat(lib)
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = ElfSymbols(str(lib), cache_dir=cache)
    assert not third.from_cache and STATS["indexed"] == before["indexed"] + 2
    assert ElfSymbols(str(lib), cache_dir=cache).from_cache
    # A corrupt cache file is ignored and replaced.
    assert third.cache_path is not None
    with open(third.cache_path, "r+b") as c:
        c.truncate(20)
    again = ElfSymbols(str(lib), cache_dir=cache)
    assert not again.from_cache and len(again) == len(first)


def test_default_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tracer.symbols.elfsyms import default_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / "natrace")


@pytest.mark.skipif(not os.path.exists(NODE), reason="node is not installed")
def test_node_cache_second_load(tmp_path: Path) -> None:
    cache = str(tmp_path)
    t0 = time.perf_counter()
    cold = ElfSymbols(NODE, cache_dir=cache)
    t1 = time.perf_counter()
    warm = ElfSymbols(NODE, cache_dir=cache)
    t2 = time.perf_counter()
    print(f"\nnode: {len(cold)} functions, cold {t1 - t0:.3f}s, warm {t2 - t1:.3f}s")
    assert cold.source == "symtab" and len(cold) > 50_000
    assert not cold.from_cache and warm.from_cache
    assert len(warm) == len(cold)
    for vaddr, _, name in list(cold.symbols())[::5000]:
        assert warm.lookup(vaddr) == (name, 0)
    assert demangle(next(n for _, _, n in cold.symbols() if n.startswith("_ZN2v8"))) \
        .startswith("v8::")


# -- hostile input ------------------------------------------------------------------

_FUZZ_DIR = tempfile.mkdtemp(prefix="natrace-elffuzz-")
atexit.register(shutil.rmtree, _FUZZ_DIR, True)


def _check_no_raise(data: bytes) -> None:
    path = os.path.join(_FUZZ_DIR, "f.so")
    with open(path, "wb") as f:
        f.write(data)
    e = ElfSymbols(path, cache_dir="", debug_dirs=[_FUZZ_DIR])
    e.lookup(0x1000)
    e.file_offset_to_vaddr(0x1000)
    e.line_for(0x1139)
    len(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data: bytes) -> None:
    _check_no_raise(b"\x7fELF" + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(min_value=0, max_value=20000),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=20000),
                                st.integers(min_value=0, max_value=255)), max_size=12))
def test_truncated_or_corrupted_elf_never_raises(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(build().libsyms.read_bytes())
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    _check_no_raise(bytes(data[:cut]) if cut < len(data) else bytes(data))


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    assert len(ElfSymbols(str(tmp_path / "nope"), cache_dir="")) == 0
    e = ElfSymbols(str(tmp_path), cache_dir="")
    assert e.error is not None and e.lookup(0) is None


@pytest.mark.parametrize("which", ["nesting", "containers", "rust"])
def test_our_line_decoder_gives_pyelftools_rows(which: str) -> None:
    """elfsyms decodes line programs itself (pyelftools keeps ~500 B a row): every row
    of the fixtures (C++ -O2 DWARF 5, Rust DWARF 4) reads back as pyelftools has it."""
    from allocfixtures import build_nofp
    from elftools.elf.elffile import ELFFile
    from test_names import rust_fixture

    from tracer.symbols.elfsyms import _decode, _FileTable

    path = {"nesting": lambda: build_nofp().nesting, "containers": lambda: build_nofp().containers,
            "rust": lambda: rust_fixture("legacy")}[which]()
    with open(path, "rb") as f:
        dwarf = ELFFile(f).get_dwarf_info()
        cus = list(dwarf.iter_CUs())
        ours = _decode(cus, dwarf)
        want: dict[int, tuple[str, int] | None] = {}
        for cu in cus:
            lp = dwarf.line_program_for_CU(cu)
            names = _FileTable(lp, cu)
            for entry in lp.get_entries():
                s = entry.state
                if s is None:
                    continue
                if not s.end_sequence:  # a sequence starting where one ends owns it
                    want[s.address] = (names.name(s.file), s.line)
                else:
                    want.setdefault(s.address, None)
    assert len(want) > 10
    assert {a: ours.lookup(a) for a in want} == want


def test_the_loaders_entry_point_is_named_start() -> None:
    """Debian's ld.so keeps no symbol for its entry point, where every stack of a
    program's start-up ends (its _start calls _dl_start): named _start, not an offset."""
    from elftools.elf.elffile import ELFFile

    path = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    with open(path, "rb") as fh:
        entry = ELFFile(fh).header["e_entry"]
    syms = ElfSymbols(path, cache_dir="")
    assert syms.lookup(entry + 8) == ("_start", 8)
