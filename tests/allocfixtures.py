"""Builds the allocation-tracing fixtures from tests/fixtures/src (once per test run).

Each fixture's source states its ground truth (bytes, blocks, function names);
tests/test_alloc_tracing.py asserts those exact figures.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).parent / "fixtures" / "src"
BUILD = Path(__file__).parent / "fixtures" / "build" / "alloc"
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer"]


@dataclass(frozen=True)
class Built:
    leaky: Path
    plugin: Path  # plugin.node, dlopen'ed by leaky --plugin
    leaky_cpp: Path
    threads: Path  # 1,000 threads x 100 B from thread_body
    execer: Path  # leaks in before_exec(), then execs (from main or a thread) or forks
    busy: Path  # in malloc/free while natrace attaches, then after_busy(): 42 x 42 B
    unreturned: Path  # allocator calls that never return, then leaks on the same thread
    memaligns: Path  # the memalign family with valid and invalid alignments, then leaks


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


@functools.cache
def build() -> Built:
    BUILD.mkdir(parents=True, exist_ok=True)
    b = BUILD
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", b / "libleak.so", SRC / "libleak.c")
    _run("gcc", *CFLAGS, "-shared", "-fPIC", "-o", b / "plugin.node", SRC / "plugin.c")
    _run("gcc", *CFLAGS, "-pthread", "-o", b / "leaky", SRC / "leaky.c", f"-L{b}", "-lleak",
         f"-Wl,-rpath,{b}", "-ldl")
    _run("g++", *CFLAGS, "-o", b / "leaky_cpp", SRC / "leaky_cpp.cpp")
    _run("gcc", *CFLAGS, "-pthread", "-o", b / "threads", SRC / "threads.c")
    _run("gcc", *CFLAGS, "-pthread", "-o", b / "execer", SRC / "execer.c")
    _run("gcc", *CFLAGS, "-o", b / "busy", SRC / "busy.c")
    _run("g++", *CFLAGS, "-o", b / "unreturned", SRC / "unreturned.cpp")
    _run("gcc", *CFLAGS, "-o", b / "memaligns", SRC / "memaligns.c")
    return Built(b / "leaky", b / "plugin.node", b / "leaky_cpp", b / "threads", b / "execer",
                 b / "busy", b / "unreturned", b / "memaligns")


@dataclass(frozen=True)
class Programs:
    """The same sources built the ways real programs are: dynamic and static, glibc and
    musl (ground truth in tests/fixtures/src/exits.cpp and plain.c)."""

    exits: Path  # frees at exit (atexit, static and thread_local destructors), C++
    exits_static: Path  # the same, g++ -static
    plain_static: Path  # glibc, gcc -static
    musl_static: Path  # musl-gcc -static
    musl: Path  # musl-gcc, dynamic (/lib/ld-musl-x86_64.so.1)


@functools.cache
def build_programs() -> Programs:
    b = BUILD / "programs"
    b.mkdir(parents=True, exist_ok=True)
    _run("g++", *CFLAGS, "-o", b / "exits", SRC / "exits.cpp")
    _run("g++", *CFLAGS, "-static", "-o", b / "exits_static", SRC / "exits.cpp")
    _run("gcc", *CFLAGS, "-static", "-o", b / "plain_static", SRC / "plain.c")
    _run("musl-gcc", *CFLAGS, "-static", "-o", b / "musl_static", SRC / "plain.c")
    _run("musl-gcc", *CFLAGS, "-o", b / "musl", SRC / "plain.c")
    return Programs(b / "exits", b / "exits_static", b / "plain_static", b / "musl_static",
                    b / "musl")


@dataclass(frozen=True)
class NoFp:
    chain: Path     # -O2 -fomit-frame-pointer; ground truth in its source
    containers: Path  # std::map / std::string leaks through libstdc++, -O2, no FP
    libnofp: Path   # -O2 -fomit-frame-pointer library
    libfp: Path     # a library with frame pointers calling back into chain
    nesting: Path   # leaks from functions inlined into their callers (test_inlined.py)
    twochains: Path  # one site, caller chains with the same registers (stack-id cache)
    childleak: Path  # run as a followed child: exec'd by a shell, or forked (no exec)


@functools.cache
def build_nofp() -> NoFp:
    """tests/fixtures/src/nofp built the way Debian builds: -O2, no frame pointers."""
    b = BUILD / "nofp"
    b.mkdir(parents=True, exist_ok=True)
    src = SRC / "nofp"
    nofp = ["-O2", "-g", "-fomit-frame-pointer"]
    _run("gcc", *nofp, "-shared", "-fPIC", "-o", b / "libnofp.so", src / "libnofp.c")
    _run("gcc", "-O2", "-g", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o",
         b / "libfp.so", src / "libfp.c")
    _run("gcc", *nofp, "-o", b / "chain", src / "chain.c", f"-L{b}", "-lnofp", "-lfp",
         f"-Wl,-rpath,{b}")
    _run("g++", *nofp, "-o", b / "containers", src / "containers.cpp")
    _run("g++", *nofp, "-o", b / "nesting", src / "nesting.cpp")
    _run("gcc", *nofp, "-shared", "-fPIC", "-o", b / "libtwochains.so", src / "libtwochains.c")
    _run("gcc", *nofp, "-o", b / "twochains", src / "twochains.c", f"-L{b}", "-ltwochains",
         f"-Wl,-rpath,{b}")
    _run("gcc", *nofp, "-shared", "-fPIC", "-o", b / "libchildplug.so", src / "libchildplug.c")
    _run("gcc", *nofp, "-o", b / "childleak", src / "childleak.c")
    return NoFp(b / "chain", b / "containers", b / "libnofp.so", b / "libfp.so", b / "nesting",
                b / "twochains", b / "childleak")


@dataclass(frozen=True)
class Trees:
    """Process trees, built the way Debian builds (-O2, no frame pointers)."""

    forker: Path  # a parent and 2 forked workers (ground truth in forker.c)
    plain: Path  # plain.c, dynamic: run through sh -c, timeout, npm start


@functools.cache
def build_trees() -> Trees:
    b = BUILD / "trees"
    b.mkdir(parents=True, exist_ok=True)
    nofp = ["-O2", "-g", "-fomit-frame-pointer"]
    _run("gcc", *nofp, "-o", b / "forker", SRC / "forker.c")
    _run("gcc", *nofp, "-o", b / "plain", SRC / "plain.c")
    return Trees(b / "forker", b / "plain")
