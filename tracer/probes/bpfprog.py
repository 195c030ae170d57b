"""Compiling natrace's BPF C sources (bpf/) with bcc.

The only module that imports bcc's BPF class; it turns bcc's failures into
NatraceErrors that say what to install or mount.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from tracer.errors import KernelFeatureError
from tracer.probes import doctor

_HEADER = "natrace.h"


def source_dir() -> Path:
    """Where the BPF sources are: the repo's bpf/ or the installed package data."""
    return Path(str(resources.files("tracer.bpfsrc")))


def import_bcc() -> ModuleType:
    """bcc comes from the OS, not PyPI: say which package when it is missing."""
    try:
        import bcc
    except ImportError:
        raise KernelFeatureError(
            "bcc's Python module is missing: install python3-bpfcc (Debian/Ubuntu) or "
            "python3-bcc (Fedora) and run natrace from a venv made with --system-site-packages"
        ) from None
    if not hasattr(bcc, "BPF"):
        raise KernelFeatureError(
            "the 'bcc' module found is PyPI's unrelated package: pip uninstall bcc, "
            "then install python3-bpfcc from your OS"
        )
    return bcc


@functools.cache
def constants() -> dict[str, int]:
    """The NATRACE_* #defines of bpf/natrace.h, so Python and BPF share one definition."""
    text = (source_dir() / _HEADER).read_text()
    return {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define (NATRACE_\w+) (\S+)", text, re.MULTILINE)
    }


def defines_symbol(path: str, name: str) -> bool:
    """Does `path` define the function `name`, as bcc's attach_uprobe(sym=) resolves it
    (aliases and versioned names included)? Checked before attaching anything."""
    bcc = import_bcc()
    try:
        bcc.BPF._check_path_symbol(path, name, None, -1)
    except Exception:  # bcc raises bare Exception for an unknown symbol
        return False
    return True


def compile_program(name: str, defines: dict[str, int | str]) -> Any:
    """Compile bpf/<name> with -D parameters; one line of bcc's complaint on failure."""
    bcc = import_bcc()
    src = source_dir()
    tracefs, check = doctor.find_tracefs()
    if tracefs is None:
        raise KernelFeatureError(f"tracefs is not usable ({check.detail}): {check.fix}")
    if not Path(f"/lib/modules/{os.uname().release}/build/include").exists():
        raise KernelFeatureError(
            f"no kernel headers at /lib/modules/{os.uname().release}/build: "
            "run scripts/provision.sh (it installs and links them)"
        )
    cflags = [f"-I{src}", "-Wno-macro-redefined", "-Wno-unused-function"]
    defines = {"NCPUS": _possible_cpus(), **defines}
    cflags += [f"-D{key}={value}" for key, value in defines.items()]
    text = _paste_bpf_headers((src / name).read_text(), src)
    try:
        with captured_stderr() as captured:
            return bcc.BPF(text=text, cflags=cflags)
    except Exception as err:  # bcc raises bare Exception on compile/load failure
        detail = _first_error_line(captured.getvalue()) or str(err).splitlines()[0]
        raise KernelFeatureError(f"could not load the BPF program {name}: {detail}") from None
    finally:
        _release_compiler_memory()


_BPF_HEADER_INCLUDE = re.compile(r'^#include "([\w.-]+\.bpf\.h)"$', re.MULTILINE)


def _paste_bpf_headers(text: str, src: Path) -> str:
    """Replace `#include "x.bpf.h"` by the file's text: bcc rewrites map calls and
    builds tracepoint argument structs only in the main source, never in headers."""
    return _BPF_HEADER_INCLUDE.sub(lambda m: (src / m.group(1)).read_text(), text)


@contextlib.contextmanager
def captured_stderr() -> Iterator[io.StringIO]:
    """Capture file descriptor 2 for a while: bcc's C++ side (clang, the verifier log,
    'cannot attach uprobe') writes there directly, and natrace's failures must stay
    one line. The text is in the yielded buffer once the block ends."""
    buf = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode(errors="replace"))


def _release_compiler_memory() -> None:
    """Give back the heap LLVM used while compiling (~50 MiB): it is freed, but glibc
    keeps freed memory for reuse, and the next compile or the tracing needs little."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _possible_cpus() -> int:
    """CPU slots per-CPU maps have (possible, not online: a CPU may come up later)."""
    from bcc.utils import get_possible_cpus

    return max(get_possible_cpus()) + 1


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return ""
