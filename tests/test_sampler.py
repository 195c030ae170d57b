"""The in-process sampler library itself: its probes follow the OpenTelemetry contract,
and preloaded while dormant it changes nothing a program does, whatever allocator sits
under it (glibc, jemalloc), across C, C++, threads, fork+exec and Node.js."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.samplerfixtures import JEMALLOC, Built, build

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
    proc = subprocess.run([str(a) for a in argv], input="\n\n", capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return "".join(line for line in proc.stdout.splitlines(keepends=True)
                   if not line.startswith("ready pid="))


@pytest.mark.parametrize("under", ["glibc", "jemalloc"])
def test_dormant_c_program_is_unchanged(built: Built, under: str) -> None:
    """Every C entry point, threads, and a forked child that execs (sampler reloaded)."""
    allocator = [JEMALLOC] if under == "jemalloc" else []
    argv = [built.family, "3", built.family, "-1"]
    bare = _run(argv, allocator)
    sampled = _run(argv, [built.library, *allocator])
    assert sampled == bare
    assert "FAILED" not in sampled and sampled.count("done") == 2


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
