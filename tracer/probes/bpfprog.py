"""Compiling natrace's BPF C sources (bpf/) with bcc, once per source and kernel.

With bpfimage.py, the only modules that import bcc's BPF class; it turns bcc's
failures into NatraceErrors that say what to install or mount. Compiled objects are
cached under ~/.cache/natrace/bpf; `python -m tracer.probes.bpfcompile` is the child
process that compiles.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from tracer.errors import KernelFeatureError, UsageError
from tracer.files import open_trusted, write_private
from tracer.probes import doctor
from tracer.symbols.elfsyms import default_cache_dir

_HEADER = "natrace.h"
_CACHE_FORMAT = 1  # bump when bpfcompile.Image changes shape
_COMPILE_TIMEOUT = 300.0
_SMALLER_NICE = 10  # a compile beside a larger one: see _yield_to_larger

#: How programs were obtained, for tests and the benchmark: compiled or from the cache.
STATS: collections.Counter[str] = collections.Counter()


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
        bcc.BPF._check_path_symbol(path.encode(), name.encode(), None, -1)
    except Exception:  # bcc raises bare Exception for an unknown symbol
        return False
    return True


@dataclasses.dataclass
class Preloaded:
    """A cached program preload() began loading: `bpf` has its maps, its programs are
    being verified on worker threads; compile_program() finishes it."""

    path: str  # its cache entry
    shared: dict[str, int] | None
    bpf: Any  # bpfimage.LoadedBPF

    def close(self) -> None:
        self.bpf.close()


def preload(name: str, defines: dict[str, int | str],
            shared: dict[str, int] | None = None) -> Preloaded | None:
    """Begin loading bpf/<name> from the cache, without waiting for the kernel's
    verifier (~0.1 s per unit that walks CFI stacks): a session preloads every probe
    set before attaching the first, so their programs are verified side by side and
    while natrace reads the target's files. None when the cache has no entry (a cold
    compile is compile_program()'s) or anything fails (compile_program() says what).
    Call it with stderr captured (a refused program's verifier log goes to fd 2)."""
    with contextlib.suppress(KernelFeatureError, OSError):
        from tracer.probes import bpfimage

        import_bcc()
        _text, _cflags, path = _request(name, defines)
        image = _read_cached(path)
        if image is not None:
            return Preloaded(path, shared, bpfimage.LoadedBPF(image, shared, wait=False))
    return None


def compile_program(name: str, defines: dict[str, int | str],
                    shared: dict[str, int] | None = None,
                    preloaded: Preloaded | None = None) -> Any:
    """bpf/<name> built with -D parameters and loaded (maps created, programs in the
    kernel, nothing attached but tracepoint__* functions; see bpfimage.LoadedBPF).

    The compiled object comes from natrace's cache when this exact source, flags,
    kernel and bcc were compiled before; otherwise a child process compiles it (one
    prepare() started already, or one started now), so LLVM's second and ~60 MiB
    never enter natrace's own process, and the cache keeps it. `shared` maps (by name,
    an fd) are another program's, not created anew. `preloaded` (preload()'s) is taken
    when it is this very program, else closed. One line of the compiler's or the
    kernel's complaint on failure."""
    import_bcc()
    from tracer.probes import bpfimage

    tracefs, check = doctor.find_tracefs()
    if tracefs is None:
        if preloaded is not None:
            preloaded.close()
        raise KernelFeatureError(f"tracefs is not usable ({check.detail}): {check.fix}")
    text, cflags, path = _request(name, defines)
    refused = False  # the cached image, preloaded, was refused: compile afresh
    if preloaded is not None:
        if (preloaded.path, preloaded.shared) == (path, shared):
            try:
                with captured_stderr():
                    preloaded.bpf.finish()
                STATS["cache_hit"] += 1
                return preloaded.bpf
            except OSError:
                refused = True  # finish() closed it
        else:
            preloaded.close()
    image = None if refused else _read_cached(path)
    if image is not None:
        STATS["cache_hit"] += 1
        try:
            with captured_stderr():
                return bpfimage.LoadedBPF(image, shared)
        except OSError:
            pass  # e.g. the kernel changed under the same release: compile afresh
    pending = _PENDING.pop(path, None)
    image = (pending or _Compile(name, text, cflags)).result()
    STATS["compiled"] += 1
    try:
        with captured_stderr() as captured:
            loaded = bpfimage.LoadedBPF(image, shared)
    except OSError as err:
        detail = _first_error_line(captured.getvalue()) or str(err)
        raise KernelFeatureError(f"could not load the BPF program {name}: {detail}") from None
    _write_cached(path, image)
    return loaded


def prepare(name: str, defines: dict[str, int | str]) -> None:
    """Start compiling bpf/<name> with `defines` now, in a child of its own, when the
    cache has no entry for it: a session's cold compiles (alloc, triage, handles) then
    run side by side instead of one after another, and compile_program() takes the
    result. A failure here (no headers, no source) is compile_program()'s to report;
    a stop signal (AttachInterrupted) is not swallowed."""
    with contextlib.suppress(KernelFeatureError, OSError):
        text, cflags, path = _request(name, defines)
        if path not in _PENDING and not _trusted_entry(path):
            _PENDING[path] = _Compile(name, text, cflags)


def _request(name: str, defines: dict[str, int | str]) -> tuple[str, list[str], str]:
    """(source text with its headers pasted, cflags, cache path) of bpf/<name>; asked
    three times per probe set (prepare, preload, load), read and hashed once."""
    text, cflags, digest = _request_once(name, tuple(defines.items()))
    return text, list(cflags), os.path.join(default_cache_dir(), "bpf", digest + ".json")


@functools.lru_cache(maxsize=16)
def _request_once(name: str, defines_items: tuple[tuple[str, int | str], ...],
                  ) -> tuple[str, tuple[str, ...], str]:
    defines = dict(defines_items)
    src = source_dir()
    text = _paste_bpf_headers((src / name).read_text(), src)
    cflags = [f"-I{src}", "-Wno-macro-redefined", "-Wno-unused-function"]
    # -g0: bcc asks clang for DWARF (and makes BTF of it), which an Image never carries;
    # but bcc creates every map while compiling, and a task-storage map only with BTF
    # (bpfimage gives it its own when loading the Image)
    if "BPF_TASK_STORAGE(" not in text:
        cflags.append("-g0")
    defines = {"NCPUS": _possible_cpus(), **defines}
    cflags += [f"-D{key}={value}" for key, value in defines.items()]
    return text, tuple(cflags), _cache_digest(text, cflags)


class _Compile:
    """bcc's compile of one source in `python -m tracer.probes.bpfcompile`, started at
    construction; request and answer go through unnamed files, so the child never
    waits for natrace to read a pipe and several compile at once."""

    def __init__(self, name: str, text: str, cflags: list[str]) -> None:
        if not Path(f"/lib/modules/{os.uname().release}/build/include").exists():
            raise KernelFeatureError(
                f"no kernel headers at /lib/modules/{os.uname().release}/build: "
                "run scripts/provision.sh (it installs and links them)"
            )
        self.name = name
        # stdin, stdout, stderr; closed by discard(), which result() always calls
        self._files = [tempfile.TemporaryFile() for _ in range(3)]  # noqa: SIM115
        request, self._out, self._err = self._files
        request.write(json.dumps({"text": text, "cflags": cflags}).encode())
        request.seek(0)
        self._deadline = time.monotonic() + _COMPILE_TIMEOUT
        self._proc = subprocess.Popen([sys.executable, "-m", "tracer.probes.bpfcompile"],
                                      stdin=request, stdout=self._out, stderr=self._err)
        self.size = len(text)
        self._niced = False
        _RUNNING.add(self)
        _yield_to_larger()

    def result(self) -> Any:
        """Wait for the child: its Image, or the compiler's complaint as one line."""
        from tracer.probes import bpfcompile

        try:
            code = self._proc.wait(timeout=max(self._deadline - time.monotonic(), 0.0))
            self._err.seek(0)
            stderr = self._err.read().decode(errors="replace")
            self._out.seek(0)
            stdout = self._out.read().decode()
        except subprocess.TimeoutExpired:
            raise KernelFeatureError(f"compiling the BPF program {self.name} took over "
                                     f"{_COMPILE_TIMEOUT:g} s") from None
        finally:
            self.discard()  # killed when interrupted or too slow; reaped either way
        if code != 0:
            line = (_first_error_line(stderr) or next(iter(stderr.strip().splitlines()[-1:]), "")
                    or f"the compiler exited with status {code}")
            raise KernelFeatureError(f"could not load the BPF program {self.name}: {line}")
        return bpfcompile.Image.from_json(stdout)

    def kill(self) -> None:
        """SIGKILL to the child unless it was reaped: a bare kill(2), safe inside a
        signal handler that interrupted Popen.wait() (which holds Popen's own lock)."""
        if self._proc.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self._proc.pid, signal.SIGKILL)

    def nice(self, niced: bool) -> None:
        """Below natrace's own priority while a larger compile runs, back to it after
        (as root; otherwise it stays where it is)."""
        if niced != self._niced and self._proc.returncode is None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self._proc.pid,
                               os.getpriority(os.PRIO_PROCESS, 0) + niced * _SMALLER_NICE)
                self._niced = niced

    def discard(self) -> None:
        """Stop the child if it still runs (natrace is leaving without its result) and
        drop its files."""
        _RUNNING.discard(self)
        _yield_to_larger()
        if self._proc.poll() is None:
            self.kill()
            self._proc.wait()
        for fh in self._files:
            fh.close()


#: Compiles prepare() started, by cache path, until compile_program() takes them.
_PENDING: dict[str, _Compile] = {}
#: Children still compiling: killed when natrace exits without waiting for them.
_RUNNING: set[_Compile] = set()


def _yield_to_larger() -> None:
    """Compiles share the CPUs with the largest running, alloc.bpf.c, the attach's
    critical path: each smaller one runs niced while it does (idle, alloc then gets a
    CPU of its own: a cold attach 1.7-2.0 s instead of 2.4-2.6), at natrace's priority
    once it is done (loaded, a compile niced to the end waited behind the load: 7.7 s
    instead of 3.5; as it is, loaded costs ~0.3 s more than no nicing at all)."""
    largest = max((c.size for c in _RUNNING), default=0)
    for compile_ in list(_RUNNING):
        compile_.nice(compile_.size < largest)


def stop_compiles() -> None:
    """Kill every compile child now, reaping none: for a stop signal's handler, which
    may run inside a wait for one of them. The wait then returns and result() reports
    the failure, which the session turns into AttachInterrupted."""
    for compile_ in list(_RUNNING):
        compile_.kill()


@atexit.register
def _discard_running() -> None:
    for compile_ in list(_RUNNING):
        compile_.discard()


def _cache_digest(text: str, cflags: list[str]) -> str:
    """The cache entry's name for the compiled object of (source, flags, headers,
    kernel, bcc)."""
    import bcc

    uname = os.uname()
    headers = sorted((p.name, p.read_text()) for p in source_dir().glob("*.h"))
    build = os.path.realpath(f"/lib/modules/{uname.release}/build")
    key = json.dumps([_CACHE_FORMAT, text, cflags, headers, uname.release, uname.version,
                      build, getattr(bcc, "__version__", "")])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _read_cached(path: str) -> Any:
    """The cached Image at `path`, or None. Trusted only when this user owns it and its
    directory and nobody else can write either: natrace loads it into the kernel."""
    from tracer.probes import bpfcompile

    fh = open_trusted(path)
    if fh is None:
        return None
    with fh:
        try:
            return bpfcompile.Image.from_json(fh.read())
        except (ValueError, KeyError, TypeError):
            return None  # torn or foreign: compiled afresh and overwritten


def _trusted_entry(path: str) -> bool:
    """Is there an entry at `path` _read_cached() would read (torn or not)?"""
    fh = open_trusted(path)
    if fh is None:
        return False
    fh.close()
    return True


def _write_cached(path: str, image: Any) -> None:
    """Keep `image` for the next run; a cache that cannot be written is no error."""
    with contextlib.suppress(OSError, UsageError):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_private(path, image.to_json())


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


@functools.cache
def _possible_cpus() -> int:
    """CPU slots per-CPU maps have (possible, not online: a CPU may come up later)."""
    from bcc.utils import get_possible_cpus

    return max(get_possible_cpus()) + 1


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if "error" in line.lower():
            return line.strip()
    return ""

