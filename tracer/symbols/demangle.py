"""C++ (Itanium ABI) and Rust (legacy and v0) demangling, cached.

Names in node and addons are mangled (`_ZN2v88internal4Heap11AllocateRawE...`); a
report must show `v8::internal::Heap::AllocateRaw(...)`. We call libstdc++'s own
`__cxa_demangle` through ctypes (what the PyPI `cxxfilt` package does, without the
dependency) and fall back to one batched `c++filt` process when libstdc++ cannot be
loaded. A name that does not demangle is returned unchanged.

Rust symbols come in two manglings: legacy (`_ZN6tinyrs11stow_crates17h<hash>E`,
Itanium-shaped with `$LT$`-style escapes and a hash segment) and v0 (`_RNv...`).
binutils' c++filt (2.36+) demangles both; one c++filt process is kept for them (it
answers line by line). Crate disambiguators (`std[e28293b1aa0f68bd]`) and legacy hashes
are dropped, as rustc's own `{:#}` display does. Without c++filt, legacy names still
demangle through __cxa_demangle and v0 names stay as they are.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

_impl: Any = None  # (demangle function, free function) or False when unavailable

_RUST_LEGACY = re.compile(r"^_ZN.*17h[0-9a-f]{16}E(\.llvm\.\d+)?$")
_LLVM_SUFFIX = re.compile(r"\.llvm\.\d+$")  # LTO's local-symbol suffix: not part of the name
_RUST_HASH = re.compile(r"::h[0-9a-f]{16}$")
_RUST_DISAMBIGUATOR = re.compile(r"\[[0-9a-f]{1,16}\]")
_RUST_ESCAPES = {"$SP$": "@", "$BP$": "*", "$RF$": "&", "$LT$": "<", "$GT$": ">",
                 "$LP$": "(", "$RP$": ")", "$C$": ",", "$u7e$": "~", "$u20$": " ",
                 "$u27$": "'", "$u5b$": "[", "$u5d$": "]", "$u7b$": "{", "$u7d$": "}",
                 "$u3b$": ";", "$u2b$": "+", "$u22$": '"'}
_RUST_ESCAPE = re.compile("|".join(re.escape(k) for k in _RUST_ESCAPES))


def _load() -> Any:
    global _impl
    if _impl is None:
        _impl = False
        for name in ("libstdc++.so.6", ctypes.util.find_library("stdc++")):
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                libc = ctypes.CDLL(None)
                fn = lib.__cxa_demangle
                fn.restype = ctypes.c_void_p
                fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.POINTER(ctypes.c_int)]
                free = libc.free
                free.argtypes = [ctypes.c_void_p]
                free.restype = None
                _impl = (fn, free)
                break
            except (OSError, AttributeError):
                continue
    return _impl


def is_mangled(name: str) -> bool:
    """Itanium-mangled symbol names start with _Z (or __Z on some platforms); Rust v0
    ones with _R."""
    return name.startswith(("_Z", "__Z")) or is_rust_v0(name)


def is_rust_v0(name: str) -> bool:
    return name.startswith("_R") and len(name) > 2 and name[2].isupper()


def is_rust(name: str) -> bool:
    base = name.partition("@")[0]
    return is_rust_v0(base) or bool(_RUST_LEGACY.match(base))


@lru_cache(maxsize=1 << 16)
def demangle(name: str) -> str:
    """Demangled `name`, or `name` itself when it is not mangled or does not demangle."""
    if not is_mangled(name):
        return name
    if is_rust(name):
        return _rust(name)
    return _itanium(name)


def _itanium(name: str) -> str:
    base, at, version = name.partition("@")  # keep symbol versions (foo@@GLIBCXX_3.4)
    impl = _load()
    if impl:
        fn, free = impl
        status = ctypes.c_int(0)
        try:
            ptr = fn(base.encode("utf-8", "surrogateescape"), None, None, ctypes.byref(status))
        except (ValueError, UnicodeEncodeError):
            return name
        if not ptr or status.value != 0:
            return name
        try:
            text = ctypes.string_at(ptr).decode("utf-8", "replace")
        finally:
            free(ptr)
        return text + at + version if at else text
    return _cxxfilt([name]).get(name, name)


def _rust(name: str) -> str:
    """A Rust name, demangled by c++filt, without hashes and crate disambiguators."""
    name = _LLVM_SUFFIX.sub("", name)
    text = _RUST_FILTER.demangle(name)
    if text is None or text == name:
        if is_rust_v0(name):
            return name
        text = _RUST_ESCAPE.sub(lambda m: _RUST_ESCAPES[m.group(0)], _itanium(name))
        text = text.replace("..", "::")
    return _RUST_DISAMBIGUATOR.sub("", _RUST_HASH.sub("", text))


class _LineFilter:
    """One long-lived c++filt answering a name per line (it flushes after each line)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._failed = False
        self._lock = threading.Lock()

    def demangle(self, name: str) -> str | None:
        if "\n" in name:
            return None
        with self._lock:
            proc = self._start()
            if proc is None or proc.stdin is None or proc.stdout is None:
                return None
            try:
                proc.stdin.write(name + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (OSError, ValueError):
                line = ""
            if not line:  # it died: stay without it
                self._failed, self._proc = True, None
                return None
            return line.rstrip("\n")

    def _start(self) -> subprocess.Popen[str] | None:
        if self._proc is None and not self._failed:
            tool = shutil.which("c++filt")
            try:
                self._proc = subprocess.Popen([tool], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True,
                                              bufsize=1) if tool else None
            except OSError:
                self._proc = None
            self._failed = self._proc is None
            if self._proc is not None:
                atexit.register(self.close)
        return self._proc

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait()


_RUST_FILTER = _LineFilter()


def demangle_many(names: Iterable[str]) -> dict[str, str]:
    """Demangle many names at once (one c++filt process when ctypes is unavailable)."""
    names = list(dict.fromkeys(names))
    if _load():
        return {n: demangle(n) for n in names}
    return _cxxfilt(names)


def _cxxfilt(names: list[str]) -> dict[str, str]:
    """Batch through `c++filt`, one name per line; identity when the tool is absent."""
    wanted = [n for n in names if is_mangled(n) and "\n" not in n]
    out = {n: n for n in names}
    tool = shutil.which("c++filt")
    if not wanted or tool is None:
        return out
    try:
        proc = subprocess.run([tool], input="\n".join(wanted) + "\n", capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return out
    lines = proc.stdout.splitlines()
    if len(lines) == len(wanted):
        out.update(zip(wanted, lines))
    return out
