"""Compiled BPF objects: compiled once in a child process, then loaded from the cache,
trusted only when nobody else could have written them."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracer.errors import KernelFeatureError
from tracer.probes import bpfcompile, bpfprog

pytestmark = pytest.mark.bpf

DEFINES: dict[str, int | str] = {"MAX_KEYS": 1024, "MAX_STACKS": 2048}


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "natrace" / "bpf"


@pytest.fixture()
def loaded() -> Iterator[list[Any]]:
    programs: list[Any] = []
    yield programs
    for bpf in programs:
        bpf.cleanup()


def _load(loaded: list[Any]) -> tuple[Any, int, int]:
    """triage.bpf.c loaded once more; (program, compiles, cache hits) since before."""
    compiled, hits = bpfprog.STATS["compiled"], bpfprog.STATS["cache_hit"]
    bpf = bpfprog.compile_program("triage.bpf.c", DEFINES)
    loaded.append(bpf)
    return bpf, bpfprog.STATS["compiled"] - compiled, bpfprog.STATS["cache_hit"] - hits


def test_second_load_comes_from_the_cache(cache: Path, loaded: list[Any]) -> None:
    first, compiles, hits = _load(loaded)
    assert (compiles, hits) == (1, 0)
    [entry] = list(cache.iterdir())
    assert entry.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    second, compiles, hits = _load(loaded)
    assert (compiles, hits) == (0, 1)
    # Fresh maps of the compiled sizes, separate from the first load's.
    assert second["futexes"].max_entries == 1024 and second["memsys_errors"].max_entries == 1024
    first["brk_now"][ctypes.c_int(0)] = ctypes.c_uint64(4242)
    assert second["brk_now"][ctypes.c_int(0)].value == 0
    assert first["brk_now"][ctypes.c_int(0)].value == 4242


def test_a_cache_entry_others_can_write_is_compiled_afresh(cache: Path,
                                                           loaded: list[Any]) -> None:
    _load(loaded)
    [entry] = list(cache.iterdir())
    os.chmod(entry, 0o666)
    _, compiles, hits = _load(loaded)
    assert (compiles, hits) == (1, 0)
    assert entry.stat().st_mode & 0o777 == 0o600  # rewritten private


def test_a_torn_cache_entry_is_compiled_afresh(cache: Path, loaded: list[Any]) -> None:
    _load(loaded)
    [entry] = list(cache.iterdir())
    entry.write_text('{"functions": {"x": ')
    _, compiles, hits = _load(loaded)
    assert (compiles, hits) == (1, 0)
    _, compiles, hits = _load(loaded)
    assert (compiles, hits) == (0, 1)


def test_a_compile_error_is_one_line() -> None:
    with pytest.raises(KernelFeatureError) as info:
        bpfprog._Compile("broken.bpf.c", "int f(void *ctx) { return nope; }", []).result()
    message = str(info.value)
    assert message.startswith("could not load the BPF program broken.bpf.c: ")
    assert "nope" in message and "\n" not in message


def test_a_prepared_compile_is_taken_by_the_load(cache: Path, loaded: list[Any]) -> None:
    """prepare() starts the cold compile in a child; the load waits for that child
    instead of starting another; once cached, prepare() starts nothing."""
    bpfprog.prepare("triage.bpf.c", DEFINES)
    [pending] = bpfprog._PENDING.values()
    _, compiles, hits = _load(loaded)
    assert (compiles, hits) == (1, 0)
    assert not bpfprog._PENDING and pending not in bpfprog._RUNNING
    bpfprog.prepare("triage.bpf.c", DEFINES)
    assert not bpfprog._PENDING
    _, compiles, hits = _load(loaded)
    assert (compiles, hits) == (0, 1)


def test_a_prepared_compile_not_taken_is_stopped(cache: Path) -> None:
    bpfprog.prepare("triage.bpf.c", DEFINES)
    [pending] = bpfprog._PENDING.values()
    bpfprog._discard_running()  # what natrace's exit does
    assert pending._proc.returncode is not None and not bpfprog._RUNNING
    bpfprog._PENDING.clear()


def test_the_stack_walk_and_its_continuations_fill_the_program_array(
        cache: Path, loaded: list[Any]) -> None:
    """bpf/stacks.bpf.h's tail calls: the loader puts tail_tp__N__* in slot N (the walk
    in 0, triage's futex and memsys continuations in 1 and 2; the page-fault one, 3, only
    with HAVE_PAGE_FAULT_USER), the rest empty."""
    bpf, _, _ = _load(loaded)
    table = bpf["tail_tp"]
    filled = []
    for slot in range(8):
        try:
            table[ctypes.c_int(slot)]
        except KeyError:
            continue
        filled.append(slot)
    assert filled == [0, 1, 2]


def test_the_compiling_child_answers_bccs_kallsyms_lookup_itself() -> None:
    """The child compiles with a two-line /proc/kallsyms of its own mount namespace:
    bcc still finds bpf_probe_read_kernel (helper 113, not bpf_probe_read's 4), and
    natrace's namespace keeps the real file."""
    text = ("int f(void *ctx) { u64 v = 0; "
            "bpf_probe_read_kernel(&v, sizeof(v), (void *)ctx); return v; }")
    image = bpfprog._Compile("probe.bpf.c", text, []).result()
    code = image.functions["f"]
    calls = [int.from_bytes(code[at + 4:at + 8], "little", signed=True)
             for at in range(0, len(code), 8) if code[at] == 0x85]
    assert calls == [113]
    assert "kallsyms" not in Path("/proc/self/mountinfo").read_text()
    with open("/proc/kallsyms") as fh:
        assert sum(1 for _ in fh) > 1000
    child = subprocess.run(
        [sys.executable, "-c", "from tracer.probes import bpfcompile; bpfcompile.short_kallsyms(); "
         "print(open('/proc/kallsyms').read(), end='')"], capture_output=True, check=True)
    assert child.stdout == bpfcompile.KALLSYMS_LOOKED_UP
    # no writable temporary directory (a read-only root file system): the real file
    child = subprocess.run(
        [sys.executable, "-c", "import tempfile; tempfile.tempdir = '/nonexistent'; "
         "from tracer.probes import bpfcompile; bpfcompile.short_kallsyms(); "
         "print(sum(1 for _ in open('/proc/kallsyms')))"], capture_output=True, check=True)
    assert int(child.stdout) > 1000


def test_a_smaller_compile_runs_niced_while_a_larger_one_does() -> None:
    """The largest compile (alloc.bpf.c in a session) is a cold attach's critical path:
    a smaller one beside it yields the CPU, then runs at natrace's priority once the
    larger is done (so on a loaded machine it never waits behind the load to the end)."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    text, cflags, _ = bpfprog._request("triage.bpf.c", DEFINES)
    large = bpfprog._Compile("large.bpf.c", text, cflags)
    small = bpfprog._Compile("small.bpf.c", "int f(void *ctx) { return 0; }", [])
    try:
        assert [os.getpriority(os.PRIO_PROCESS, c._proc.pid) for c in (large, small)] == \
            [own, own + bpfprog._SMALLER_NICE]
        large.result()
        assert small._proc.poll() is not None or \
            os.getpriority(os.PRIO_PROCESS, small._proc.pid) == own
        small.result()
    finally:
        large.discard()
        small.discard()
