"""Readable names: Rust demangled (legacy and v0), C++ names shortened in tables with
the full name kept in JSON, file:line from DWARF for -g binaries."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from allocfixtures import SRC, build

from tracer.model.frames import Frame, shorten
from tracer.symbols.demangle import demangle

NATRACE = str(Path(sys.executable).with_name("natrace"))
BUILD = Path(__file__).parent / "fixtures" / "build" / "rust"


def test_rust_legacy_and_v0_names_demangle() -> None:
    assert demangle("_ZN6tinyrs11stow_crates17hcf65780d2ac421c3E") == "tinyrs::stow_crates"
    assert demangle("_ZN1t14Cache$LT$T$GT$3put17he8c9f08b8692587dE") == "t::Cache<T>::put"
    assert demangle("_ZN9hashbrown3raw21RawTable$LT$T$C$A$GT$14reserve_rehash17h29d98435ddcf"
                    "2840E.llvm.18179425456680597278") == \
        "hashbrown::raw::RawTable<T,A>::reserve_rehash"
    assert demangle("_RNvCsjMaewn57Afh_6tinyrs11stow_crates") == "tinyrs::stow_crates"
    assert demangle("_RNvMCsjMaewn57Afh_1tINtB2_5CacheINtNtCslNYArtu3iFV_5alloc3vec3VechEE"
                    "3putB2_") == "<t::Cache<alloc::vec::Vec<u8>>>::put"
    assert demangle("_ZN5vault6Widget4growEi") == "vault::Widget::grow(int)"  # C++ as before


@pytest.mark.parametrize(("full", "short"), [
    ("std::vector<int, std::allocator<int> >::_M_realloc_insert<int const&>(__gnu_cxx::"
     "__normal_iterator<int*, std::vector<int, std::allocator<int> > >, int const&)",
     "std::vector<…>::_M_realloc_insert<…>"),
    ("int vault::twice<int>(int)", "vault::twice<…>"),
    ("operator new(unsigned long)", "operator new"),
    ("(anonymous namespace)::Cache::put(std::string const&) const",
     "(anonymous namespace)::Cache::put"),
    ("<t::Cache<alloc::vec::Vec<u8>>>::put", "<t::Cache<…>>::put"),
    ("<hashbrown::raw::RawTable<(u32, alloc::vec::Vec<u8>)>>::reserve_rehash::<hashbrown::"
     "map::make_hasher<u32>::{closure#0}>", "<hashbrown::raw::RawTable<…>>::reserve_rehash::<…>"),
    ("free@@GLIBC_2.2.5", "free"),
])
def test_names_are_shortened_for_tables(full: str, short: str) -> None:
    assert shorten(full) == short
    frame = Frame(0x1000, "/opt/app", 0x1000, full, 0x10)
    assert frame.label(short=True) == short + "+0x10"
    assert frame.label() == full + "+0x10"


def rustc() -> str:
    found = shutil.which("rustc") or str(Path.home() / ".cargo" / "bin" / "rustc")
    assert Path(found).exists(), "rustc is not installed (scripts/provision.sh installs it)"
    return found


@functools.cache
def rust_fixture(mangling: str) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / f"stow-{mangling}"
    flags = [] if mangling == "legacy" else [f"-Csymbol-mangling-version={mangling}"]
    subprocess.run([rustc(), "-O", "-g", "--crate-name", "tinyrs", *flags, "-o", str(out),
                    str(SRC / "rust" / "stow.rs")], check=True, capture_output=True)
    return out


def run_json(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "r.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", *argv],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@pytest.mark.bpf
@pytest.mark.parametrize("mangling", ["legacy", "v0"])
def test_a_rust_program_is_demangled(tmp_path: Path, mangling: str) -> None:
    report = run_json(tmp_path, str(rust_fixture(mangling)))
    closure = "{{closure}}" if mangling == "legacy" else "{closure#0}"
    stow = {s["function"]: (s["bytes"], s["blocks"], s["stack"][s["charge_index"]]["inlined"])
            for s in report["sites"] if s["function"].startswith("tinyrs::stow_crates")}
    assert stow == {"tinyrs::stow_crates": (80, 1, False),
                    f"tinyrs::stow_crates::{closure}": (1_000, 10, True)}, \
        [s["label"] for s in report["sites"]]
    names = [f["symbol"] for s in report["sites"] for f in s["stack"] if f["symbol"]]
    assert not [n for n in names if n.startswith(("_ZN", "_R"))], names
    assert any("tinyrs" in n and "Cache" in n for n in names) or len(names) > 5, names


@pytest.mark.bpf
def test_file_and_line_for_a_debug_build(tmp_path: Path) -> None:
    """leaky is built with -g: the charged frame names leaky.c and the line of its
    malloc call, in JSON and in the text's labels."""
    line = next(i for i, text in enumerate((SRC / "leaky.c").read_text().splitlines(), 1)
                if "sink = malloc(1000);" in text)
    report = run_json(tmp_path, str(build().leaky))
    site = next(s for s in report["sites"] if s["function"] == "leak_malloc")
    frame = site["stack"][site["charge_index"]]
    assert (Path(frame["file"]).name, frame["line"]) == ("leaky.c", line)
    assert site["label"].endswith(f"(leaky.c:{line})")
    caller = site["stack"][site["charge_index"] + 1]
    assert caller["symbol"] == "main" and Path(caller["file"]).name == "leaky.c"
