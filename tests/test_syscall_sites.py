"""The memory syscalls from uprobes at libc's and the loader's syscall sites
(tracer/probes/syscallsites.py) instead of raw_syscalls, whose programs put every
syscall of the process on the kernel's traced-syscall path: the same report, figure for
figure and frame for frame, and no raw_syscalls program attached, read back from the
kernel's own description of natrace's links (/proc/PID/fdinfo)."""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from samplerfixtures import build as build_sampler
from test_attach import _links
from tracing import NATRACE, attach, release

from tracer.probes import syscallsites
from tracer.probes.allocators import vaddr_to_offset

pytestmark = pytest.mark.bpf

SRC = Path(__file__).parent / "fixtures" / "src" / "triage"
BUILD = Path(__file__).parent / "fixtures" / "build" / "triage"
PAGE = 4096


@functools.cache
def _build() -> tuple[Path, Path, Path]:
    """mapper, the library it dlopen()s, and mapper linked statically, -O2 without frame
    pointers (Debian's)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    exe, lib, static = BUILD / "mapper", BUILD / "mapper_lib.so", BUILD / "mapper_static"
    for args in (["-o", exe, SRC / "mapper.c", "-ldl"],
                 ["-shared", "-fPIC", "-o", lib, SRC / "mapper_lib.c"],
                 ["-static", "-o", static, SRC / "mapper.c"]):
        subprocess.run(["gcc", "-O2", "-g", *map(str, args)], check=True, capture_output=True)
    return exe, lib, static


def _traced(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any],
                                                                      list[dict[str, str]]]:
    """mapper traced by `snapshot -p ARGS` over its work: (the JSON report, natrace's
    BPF links while attached)."""
    exe, lib, _static = _build()
    proc = subprocess.Popen([str(exe), str(lib)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        tracer = attach(proc.pid, "--duration", "10m", "--json", *args)
        try:
            links, _perf = _links(tracer.pid)
            release(proc)
        finally:
            tracer.send_signal(signal.SIGINT)
            out, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        return json.loads(out), links
    finally:
        proc.kill()
        proc.wait()


def _raw(links: list[dict[str, str]]) -> collections.Counter[str]:
    return collections.Counter(link["tp_name"] for link in links
                               if link["link_type"] == "raw_tracepoint")


def _site_probes(links: list[dict[str, str]]) -> set[tuple[str, int]]:
    """(file, offset) of natrace's uprobes at a memory syscall's site."""
    wanted = set()
    for link in links:
        if link["link_type"] == "uprobe_multi":
            for row in link["probes"].split(";"):
                wanted.add((link["path"], int(row.split()[0], 16)))
    return wanted


def _expected_sites(pid: int) -> set[tuple[str, int]]:
    from elftools.elf.elffile import ELFFile

    from tracer.probes.target import mapped_files

    sites = syscallsites.find(mapped_files(pid), os.readlink(f"/proc/{pid}/exe"))
    assert sites is not None
    out = set()
    for site in sites:
        with open(site.path, "rb") as fh:
            loads = [(s["p_vaddr"], s["p_offset"], s["p_filesz"])
                     for s in ELFFile(fh).iter_segments() if s["p_type"] == "PT_LOAD"]
        offset = vaddr_to_offset(loads, site.vaddr)
        assert offset is not None
        out.add((os.path.realpath(site.path), offset))
    return out


def _memory_sites(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every mmap/brk site of the report, the runtime's included, frame by frame."""
    rows = [*report["sites"], *report["runtime"]["sites"]]
    return sorted((s["kind"], s["function"], s["bytes"], s["blocks"], s["allocator_internal"],
                   tuple(f["label"] for f in s["stack"]))
                  for s in rows if s["kind"] != "malloc")


def test_without_triage_the_memory_syscalls_come_from_libcs_syscall_sites() -> None:
    """--no-triage: no raw_syscalls program; one uprobe on the instruction after each
    memory syscall of libc and ld.so; and the report of --triage (raw_syscalls, today's
    path), figure for figure and frame for frame: mmap, munmap (partial), mremap, a
    PROT_NONE reservation committed and decommitted by mprotect and MAP_FIXED mmap, brk
    through sbrk, mmap inside malloc, the loader's anonymous .bss of a dlopen."""
    sites_report, sites_links = _traced("--no-triage")
    raw_report, raw_links = _traced("--triage")
    assert "sys_enter" not in _raw(sites_links) and "sys_exit" not in _raw(sites_links)
    assert _raw(raw_links)["sys_enter"] == _raw(raw_links)["sys_exit"] == 1
    assert _raw(sites_links) == {"sched_process_exec": 2, "sched_process_fork": 1,
                                 "sched_process_exit": 1}
    exe, lib, _static = _build()
    probe = subprocess.Popen([str(exe), str(lib)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline().startswith("ready")
        expected = _expected_sites(probe.pid)
    finally:
        probe.kill()
        probe.wait()
    assert len(expected) == 9  # libc: mmap, munmap, mremap, mprotect, brk; ld.so: all but mremap
    assert expected <= _site_probes(sites_links)
    assert not expected & _site_probes(raw_links)

    memory = _memory_sites(sites_report)
    assert memory == _memory_sites(raw_report)
    by_function = {(kind, fn): (size, blocks, internal)
                   for kind, fn, size, blocks, internal, _stack in memory}
    # mapper.c: 8 + 3 + 4 pages live in 4 ranges (the second split by its munmap)
    assert by_function[("mmap", "map_some")] == (15 * PAGE, 4, False)
    # 64 pages reserved PROT_NONE, 32 made rw- by mprotect, 8 of them decommitted by
    # mmap(MAP_FIXED, PROT_NONE) and 4 by mprotect(PROT_NONE): 20 pages, all charged to the
    # reserving mmap's caller; the 44 PROT_NONE ones named in a note, not counted
    assert by_function[("mmap", "reserve")] == (20 * PAGE, 3, False)
    for report in (sites_report, raw_report):
        reserved = [n for n in report["notes"] if n.startswith("address space reserved")]
        assert reserved == ["address space reserved PROT_NONE while traced: 176.0 KiB in 3 "
                            "ranges, not counted as unfreed (until mprotect makes it "
                            "accessible)"], report["notes"]
    assert by_function[("mmap", "big")] == ((1 << 20) + PAGE, 1, True)  # malloc's own mmap
    # the loader's mmap of mapper_lib.so's 1 MiB .bss (ld.so's own wrapper), charged
    # to dlopen's caller
    bss = next(m for m in memory if m[:2] == ("mmap", "main"))
    assert bss[2:5] == (1 << 20, 1, False) and "_dl_map_object_from_fd" in bss[5][1]
    grown = by_function[("brk", "grow_heap")]  # sbrk from malloc: past the heap's start
    assert grown[0] > 0 and grown[0] % PAGE == 0 and grown[2]
    assert sites_report["loss"] == raw_report["loss"]
    assert sites_report["loss"]["events_lost"] == 0


def test_production_mode_attaches_no_raw_syscalls_program() -> None:
    """The process samples itself and triage is left out: no program on raw_syscalls (its
    futex calls and the uretprobe syscall stay off the traced path); with --triage they
    come back, one per direction."""
    library = build_sampler().library
    env = {**os.environ, "LD_PRELOAD": str(library)}
    report, links = _traced("--sample", "1", env=env)
    assert report["mode"] == "sampled (in-process, mean 1 B)"
    assert "sys_enter" not in _raw(links) and "sys_exit" not in _raw(links)
    assert _site_probes(links) and report["loss"]["events_lost"] == 0
    asked, asked_links = _traced("--sample", "1", "--triage", env=env)
    assert _raw(asked_links)["sys_enter"] == _raw(asked_links)["sys_exit"] == 1
    assert _memory_sites(report) == _memory_sites(asked)
    assert ("mmap", "map_some", 15 * PAGE, 4) in [m[:4] for m in _memory_sites(report)]


@pytest.mark.parametrize("linked", ["dynamic", "static"])
def test_a_followed_exec_keeps_the_memory_syscalls(tmp_path: Path, linked: str) -> None:
    """`run --no-triage --no-children` of a command that execs mapper: the syscall sites
    are probed at launch (the planned libc and loader) and stay across the exec; into a
    static mapper, which has none, natrace attaches raw_syscalls at the exec. Either
    way the report is raw_syscalls' (--triage)."""
    from allocfixtures import build as build_alloc

    exe, _lib, static = _build()
    program = str(exe if linked == "dynamic" else static)
    reports, raw_links = [], []
    for how in ("--no-triage", "--triage"):
        out = tmp_path / f"{how}.json"
        proc = subprocess.Popen([NATRACE, "run", "--json", "-o", str(out), how,
                                 "--no-children", "--", str(build_alloc().execer), program],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
            raw_links.append(_raw(_links(proc.pid)[0]))  # mapper runs, past the exec
            _out, err = proc.communicate("x", timeout=180)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        reports.append(json.loads(out.read_text()))
    sites, raw = (_memory_sites(r) for r in reports)
    assert sites == raw
    assert [m[:5] for m in sites if m[1] == "map_some"] == [("mmap", "map_some", 15 * PAGE, 4,
                                                            False)]
    # from the exec on, raw_syscalls only for the static program
    assert raw_links[0]["sys_enter"] == raw_links[0]["sys_exit"] == (linked == "static")
    assert raw_links[1]["sys_enter"] == raw_links[1]["sys_exit"] == 1
