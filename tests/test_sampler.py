"""The in-process sampler library itself: its probes follow the OpenTelemetry contract,
and preloaded while dormant it changes nothing a program does, whatever allocator sits
under it (glibc, jemalloc), across C, C++, threads, fork+exec and Node.js."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests import tracing
from tests.samplerfixtures import JEMALLOC, Built, build
from tracer.model.frames import Frame
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.reporters import json as json_report
from tracer.reporters import text as text_report

INTERPOSED = [
    "malloc", "free", "calloc", "realloc", "reallocarray", "posix_memalign",
    "aligned_alloc", "memalign", "valloc", "pvalloc",
    "_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t", "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t", "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t", "_ZdlPv", "_ZdaPv", "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t", "_ZdlPvm", "_ZdaPvm", "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t", "_ZdlPvmSt11align_val_t", "_ZdaPvmSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t", "_ZdaPvSt11align_val_tRKSt9nothrow_t",
]


@pytest.fixture(scope="module")
def built() -> Built:
    return build()


def test_probes_follow_the_opentelemetry_contract(built: Built) -> None:
    notes = subprocess.run(["readelf", "-n", str(built.library)], capture_output=True,
                           text=True, check=True).stdout
    probes = re.findall(r"Provider: (\S+)\s+Name: (\S+)\s+Location: \S+, Base: \S+, "
                        r"Semaphore: (0x[0-9a-f]+)\s+Arguments: ([^\n]*)", notes)
    found = {(prov, name): (int(sem, 16), args.strip()) for prov, name, sem, args in probes}
    assert set(found) == {("otel_memory", "alloc"), ("otel_memory", "free")}
    # arguments in the SysV argument registers, where the OpenTelemetry profiler reads them
    assert found["otel_memory", "alloc"][1] == "8@%rdi 8@%rsi 8@%rdx"
    assert found["otel_memory", "free"][1] == "8@%rdi"
    # each probe has a semaphore (dormant until a tracer counts itself in)
    assert all(sem != 0 for sem, _ in found.values())
    assert found["otel_memory", "alloc"][0] != found["otel_memory", "free"][0]


def test_exports_every_interposed_entry_point(built: Built) -> None:
    dynsym = subprocess.run(["nm", "-D", "--defined-only", str(built.library)],
                            capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in dynsym.splitlines()}
    assert set(INTERPOSED) <= exported
    assert "natrace_sampler" in exported  # the configuration natrace writes at attach
    assert not any(s.startswith(("otel_memory", "next", "boot_")) for s in exported)


def _run(argv: list[str | Path], preload: list[Path]) -> str:
    env = {**os.environ}
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = " ".join(map(str, preload))
    proc = subprocess.run([str(a) for a in argv], input="xx", capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr + "".join(line for line in proc.stdout.splitlines(keepends=True)
                                 if not line.startswith("ready pid="))


@pytest.mark.parametrize("under", ["glibc", "jemalloc"])
def test_dormant_c_program_is_unchanged(built: Built, under: str) -> None:
    """Every C entry point, threads, and a forked child that execs (sampler reloaded)."""
    allocator = [JEMALLOC] if under == "jemalloc" else []
    argv = [built.family, "3", built.family, "-1"]
    bare = _run(argv, allocator)
    sampled = _run(argv, [built.library, *allocator])
    assert sampled == bare
    assert "FAILED" not in sampled and sampled.count("done") == 1
    assert sampled.count("live ") == 9 + 3 + 9  # the parent's, its threads', the child's


@pytest.mark.parametrize("under", ["glibc", "jemalloc"])
def test_dormant_cpp_program_is_unchanged(built: Built, under: str) -> None:
    allocator = [JEMALLOC] if under == "jemalloc" else []
    bare = _run([built.family_cpp], allocator)
    assert _run([built.family_cpp], [built.library, *allocator]) == bare
    assert bare.count("live ") == 8 and bare.count("freed ") == 13


def test_dormant_node_with_an_addon(built: Built, tmp_path: Path) -> None:
    addon = tmp_path / "addon.node"
    subprocess.run(["gcc", "-shared", "-fPIC", "-I/usr/include/node", "-o", str(addon),
                    str(Path(__file__).parent.parent / "bench" / "workloads" / "addon.c")],
                   check=True, capture_output=True)
    script = ("const a = require(process.argv[1]); let n = 0;"
              "for (let i = 0; i < 2000; i++) { n += Buffer.alloc(100 + i).length; }"
              "console.log(typeof a, n);")
    out = subprocess.run(["node", "-e", script, str(addon)], capture_output=True, text=True,
                         env={**os.environ, "LD_PRELOAD": str(built.library)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "object 2199000"


def test_start_up_arena_blocks_never_reach_the_allocator(built: Built) -> None:
    """Dormant free and realloc test the semaphores and the arena flag in one load: once
    an arena block exists, they look further and keep it from glibc."""
    assert _run([built.startup_arena], []) == "ok\n"


def test_dormant_entry_points_are_a_test_and_a_tail_call(built: Built) -> None:
    """What a dormant call costs: one load of the gate, a branch, the jump to the next
    allocator (issue 20's dormant limit is counted in instructions)."""
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(built.library)],
                         capture_output=True, text=True, check=True).stdout
    for name in ("malloc", "free", "calloc", "realloc", "posix_memalign", "_Znwm", "_ZdlPv",
                 "_ZdlPvm", "_ZnwmSt11align_val_t"):
        body = dis.split(f"<{name}>:\n", 1)[1].split("\n\n", 1)[0].splitlines()
        ops = [line.split("\t")[1].split()[0] for line in body[:4]]
        assert ops[0] in ("mov", "movzwl") and ops[1] == "test" and ops[2] == "jne", (name, ops)
        assert ops[3] == "jmp" and "*" in body[3], (name, body[3])


def test_sampler_path_is_the_built_library(built: Built) -> None:
    out = subprocess.run([tracing.NATRACE, "sampler-path"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(built.library)


def test_sampled_and_exact_exclude_each_other() -> None:
    out = subprocess.run([tracing.NATRACE, "run", "--sampled", "--exact", "--", "true"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "natrace: --sampled and --exact exclude each other: pick one"]


def test_an_in_process_report_shows_estimates_with_their_error() -> None:
    site = Site("malloc", [Frame(0x1234, "/app", 0x1234, "leak_here", 0, None, None, "app")],
                bytes=10_000_000, blocks=10_000, samples=2_500)
    snap = Snapshot(pid=1, command="app", taken_at=0.0, duration=1.0, sample_bytes=4096,
                    in_process=True, sites=[site])
    assert snap.mode == "sampled (in-process, mean 4,096 B)"
    # 1.96 / sqrt(2500) = 3.92%
    assert site.interval(site.bytes, site.samples, 4096) == (9_608_000, 10_392_000)
    assert site.interval(site.bytes, site.samples, 1) == (10_000_000, 10_000_000)
    assert site.interval(site.bytes, 0, 4096) is None  # a recording: counts not kept
    text = text_report.render(snap)
    assert "Unfreed: ~10,000,000 bytes in ~10,000 blocks" in text
    assert "~ 2,500 samples, 95% interval 9,608,000-10,392,000 bytes" in text
    row = json_report.to_dict(snap)["sites"][0]
    assert row["samples"] == 2_500 and row["bytes_interval"] == [9_608_000, 10_392_000]
