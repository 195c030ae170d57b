"""Triage probes (locks, memory syscalls, page faults) against fixtures with exact ground
truth (tests/fixtures/src/triage/*.c), and the triage mode (--no-allocs)."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tracing import snapshot_json, waiting

from tracer.model.locks import percentile_ns
from tracer.symbols.unwind import _ends_in_call, splice_caller

NATRACE = str(Path(sys.executable).with_name("natrace"))
SRC = Path(__file__).parent / "fixtures" / "src" / "triage"
BUILD = Path(__file__).parent / "fixtures" / "build" / "triage"
PAGE = 4096


@functools.cache
def build(name: str, *flags: str) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / name
    subprocess.run(["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", *flags, "-o",
                    str(out), str(SRC / f"{name}.c")], check=True, capture_output=True)
    return out


def run_json(tmp_path: Path, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    out = tmp_path / "report.json"
    proc = subprocess.run([NATRACE, "run", "--json", "-o", str(out), *args],
                          capture_output=True, text=True, timeout=180)
    assert out.exists(), proc.stderr
    return json.loads(out.read_text()), proc


# -- without BPF ------------------------------------------------------------------------

def test_percentile_of_a_log2_histogram_is_capped_by_the_max() -> None:
    hist = [0] * 40
    hist[10] = 98  # [1024, 2048) ns
    hist[20] = 2  # [1 Mi, 2 Mi) ns
    assert percentile_ns(hist, 0.5, 1_500_000) == 2048
    assert percentile_ns(hist, 0.99, 1_500_000) == 1_500_000
    assert percentile_ns([0] * 40, 0.99, 0) == 0


def test_call_instruction_forms_before_a_return_address() -> None:
    assert _ends_in_call(bytes([0, 0, 0xE8, 1, 2, 3, 4]))  # call rel32
    assert _ends_in_call(bytes([0, 0, 0, 0, 0, 0xFF, 0xD0]))  # call *%rax
    assert _ends_in_call(bytes([0, 0, 0, 0, 0x41, 0xFF, 0xD3]))  # call *%r11
    assert _ends_in_call(bytes([0, 0xFF, 0x15, 1, 2, 3, 4]))  # call *disp(%rip)
    assert _ends_in_call(bytes([0, 0, 0, 0, 0xFF, 0x55, 0x08]))  # call *8(%rbp)
    assert not _ends_in_call(bytes([0, 0, 0, 0, 0, 0x48, 0x89]))


def test_splice_caller_puts_back_the_skipped_frame_once() -> None:
    assert splice_caller((1, 3), 2) == (1, 2, 3)
    assert splice_caller((1, 2, 3), 2) == (1, 2, 3)
    assert splice_caller((), 2) == ()


# -- tracing ------------------------------------------------------------------------------

@pytest.mark.bpf
def test_contended_mutex_is_flagged_with_its_locking_function(tmp_path: Path) -> None:
    rec = tmp_path / "contend.natrace"
    report, proc = run_json(tmp_path, "--record", str(rec), "--", str(build("contend")),
                            "200000")
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"hot (0x[0-9a-f]+) cold (0x[0-9a-f]+)", proc.stdout)
    assert m, proc.stdout
    hot, cold = int(m.group(1), 16), int(m.group(2), 16)
    assert report["mode"] == "full"
    locks = {lk["uaddr"]: lk for lk in report["locks"]["locks"]}
    lock = locks[hot]
    assert lock["contended"] and lock["rules"], lock
    assert lock["kind"] == "mutex"
    assert lock["waiters"][0]["function"] == "lock_hot"  # the fixture, not libc
    assert lock["waiters"][0]["via"].endswith("pthread_mutex_lock")
    assert lock["wakers"][0]["function"] == "lock_hot"
    assert lock["waits"] > 0 and lock["wake_calls"] > 0
    # One thread alone never waits on `cold`: no futex call at all, or none flagged.
    assert cold not in locks or not locks[cold]["contended"]
    # pthread_join waits are idle time, never contention.
    assert all(not lk["contended"] for lk in report["locks"]["locks"] if lk["uaddr"] != hot)
    # The text says thread-seconds (blocked time summed over threads, which can exceed
    # the time traced), never a share above 100%, and lists only words waited on.
    text = subprocess.run([NATRACE, "report", str(rec), "--top", "100"], capture_output=True,
                          text=True, timeout=60).stdout
    all_locks = report["locks"]["locks"]
    waited = [lk for lk in all_locks if lk["waits"]]
    assert f"Locks (futex words): {len(all_locks)} seen, {len(waited)} waited on" in text
    listed = re.findall(r"^  (?:ok|CONTENDED \([^)]*\))\s+.*? (0x[0-9a-f]+) \(\w+\): ([\d,]+) "
                        "waits", text, re.M)
    assert sorted(int(a, 16) for a, _ in listed) == sorted(lk["uaddr"] for lk in waited)
    assert all(n != "0" for _, n in listed)
    assert f"{lock['wait_ns'] / 1e9:.3g} thread-s blocked ({lock['share']:.2f} threads " \
           "waiting on average)" in text
    assert lock["thread_seconds"] == round(lock["wait_ns"] / 1e9, 9)
    assert "of traced time)" not in text


@pytest.mark.bpf
@pytest.mark.parametrize("mode", ["triage", "full"])
def test_memory_syscalls_counts_bytes_and_errors_are_exact(mode: str) -> None:
    """In full mode triage's raw_syscalls programs are not attached: alloc's tail-call
    them (bpf/alloc.bpf.c's sys_next), after their own work and stack walk."""
    with waiting(str(build("memsys"))) as target:
        report = snapshot_json(target, *(["--no-allocs"] if mode == "triage" else []))
    assert report["mode"] == mode
    rows = {s["syscall"]: s for s in report["syscalls"]}
    # Between attach and "done" the fixture makes only do_maps()'s calls (memsys.c).
    expected = {  # syscall: (calls, failed, errors, bytes)
        "mmap": (4, 0, {}, 4 * 4 * PAGE),
        "mremap": (1, 0, {}, 8 * PAGE),
        "mprotect": (3, 0, {}, 3 * PAGE),
        "madvise": (5, 3, {"EINVAL": 3}, 2 * 2 * PAGE),
        "munmap": (6, 2, {"EINVAL": 2}, (8 + 3 * 4) * PAGE),
        "brk": (0, 0, {}, 0),
    }
    for name, (calls, failed, errors, nbytes) in expected.items():
        row = rows[name]
        assert (row["calls"], row["failed"], row["errors"], row["bytes"]) == \
            (calls, failed, errors, nbytes), row
    for name in ("mmap", "munmap"):
        sites = rows[name]["sites"]
        assert [(s["function"], s["calls"], s["failed"], s["bytes"]) for s in sites] == \
            [("do_maps", rows[name]["calls"], rows[name]["failed"], rows[name]["bytes"])]


@pytest.mark.bpf
def test_triage_mode_attributes_page_faults_without_malloc_probes(tmp_path: Path) -> None:
    report, proc = run_json(tmp_path, "--no-allocs", "--", str(build("faults")))
    assert proc.returncode == 0, proc.stderr
    assert report["mode"] == "triage"
    assert report["calls"] == {} and report["sites"] == []  # no malloc probes ran
    faults = report["faults"]
    assert faults["available"]
    by_function = {s["function"]: s["faults"] for s in faults["sites"]}
    # 256 fresh anonymous pages, huge pages refused: each page faults once, in the
    # function that writes it (fault-around only applies to file-backed pages).
    assert by_function["touch_pages"] == 256
    assert faults["total"] >= 256


@pytest.mark.bpf
def test_a_fault_at_a_functions_first_instruction_is_that_function_with_its_callers(
        tmp_path: Path) -> None:
    """A page fault's pc is the faulting instruction, not a return address: named and
    unwound from its own row, not from the byte before it (the function before, or
    padding without unwind rows, which ended such stacks at their first frame)."""
    report, proc = run_json(tmp_path, "--", str(build("codefault", "-O2",
                                                          "-fomit-frame-pointer")))
    assert proc.returncode == 0, proc.stderr
    far = [s for s in report["faults"]["sites"] if s["stack"][0].startswith("far_away ")]
    assert [(s["faults"], s["function"], [f.split("+")[0] for f in s["stack"][1:3]])
            for s in far] == [(1, "far_away", ["main", "__libc_start_call_main"])], \
        report["faults"]["sites"]
