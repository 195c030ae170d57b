"""Builds the symbolizer's fixture binaries from tests/fixtures/src/symbols (once per run)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

SRC = Path(__file__).parent / "fixtures" / "src" / "symbols"
BUILD = Path(__file__).parent / "fixtures" / "build" / "symbols"


@dataclass(frozen=True)
class Built:
    libsyms: Path  # full .symtab and DWARF
    stripped: Path  # strip --strip-all: .dynsym only
    split: Path  # stripped; its .symtab lives in debug_root by build-id
    debug_root: Path
    linked: Path  # no build-id; .gnu_debuglink to linked_debug in a .debug/ subdir
    linked_debug: Path
    cxx: Path
    addon: Path  # vault.node
    host: Path


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def build_id(path: Path) -> str:
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                for note in sec.iter_notes():  # type: ignore[attr-defined]
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"])
    raise AssertionError(f"{path} has no build-id")


@functools.cache
def build() -> Built:
    """Compile everything into tests/fixtures/build/symbols (gitignored)."""
    if BUILD.exists():
        shutil.rmtree(BUILD)
    BUILD.mkdir(parents=True)
    b = BUILD
    cflags = ["-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer"]
    _run("gcc", *cflags, "-Wl,--build-id", "-o", b / "libsyms.so", SRC / "libsyms.c")

    shutil.copy(b / "libsyms.so", b / "libsyms-stripped.so")
    _run("strip", "--strip-all", b / "libsyms-stripped.so")

    _run("gcc", *cflags, "-Wl,--build-id", "-o", b / "libsplit.so", SRC / "libsyms.c")
    _run("objcopy", "--only-keep-debug", b / "libsplit.so", b / "libsplit.debug")
    _run("strip", "--strip-all", b / "libsplit.so")
    bid = build_id(b / "libsplit.so")
    debug_root = b / "debugroot"
    (debug_root / ".build-id" / bid[:2]).mkdir(parents=True)
    os.replace(b / "libsplit.debug", debug_root / ".build-id" / bid[:2] / f"{bid[2:]}.debug")

    _run("gcc", *cflags, "-Wl,--build-id=none", "-o", b / "liblinked.so", SRC / "libsyms.c")
    (b / ".debug").mkdir()
    linked_debug = b / ".debug" / "liblinked.so.dbg"
    _run("objcopy", "--only-keep-debug", b / "liblinked.so", linked_debug)
    _run("strip", "--strip-all", b / "liblinked.so")
    # objcopy wants the debug file next to us to compute its CRC.
    shutil.copy(linked_debug, b / "liblinked.so.dbg")
    _run("objcopy", "--add-gnu-debuglink=" + str(b / "liblinked.so.dbg"), b / "liblinked.so")
    os.unlink(b / "liblinked.so.dbg")

    _run("g++", "-shared", "-fPIC", "-O1", "-o", b / "libcxx.so", SRC / "libcxx.cpp")
    _run("gcc", "-shared", "-fPIC", "-O1", "-fno-omit-frame-pointer", "-o", b / "vault.node",
         SRC / "addon.c")
    _run("gcc", "-O1", "-fno-omit-frame-pointer", "-o", b / "host", SRC / "host.c", "-ldl")
    return Built(b / "libsyms.so", b / "libsyms-stripped.so", b / "libsplit.so", debug_root,
                 b / "liblinked.so", linked_debug, b / "libcxx.so", b / "vault.node",
                 b / "host")


def source_line(tag: str) -> int:
    """Line number of the `LINE:<tag>` marker in libsyms.c."""
    for n, line in enumerate((SRC / "libsyms.c").read_text().splitlines(), 1):
        if re.search(rf"LINE:{tag}\b", line):
            return n
    raise AssertionError(tag)


def fake_maps(path: Path, base: int, inode: int | None = None) -> list[str]:
    """/proc/PID/maps lines as the loader would map `path` at `base` (page-aligned)."""
    ino = inode if inode is not None else os.stat(path).st_ino
    lines = []
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            start = base + (seg["p_vaddr"] & ~0xFFF)
            end = base + ((seg["p_vaddr"] + seg["p_memsz"] + 0xFFF) & ~0xFFF)
            flags = seg["p_flags"]
            perms = ("r" if flags & 4 else "-") + ("w" if flags & 2 else "-") + (
                "x" if flags & 1 else "-") + "p"
            lines.append(f"{start:x}-{end:x} {perms} {seg['p_offset'] & ~0xFFF:08x} "
                         f"08:01 {ino}                      {path}\n")
    return lines
