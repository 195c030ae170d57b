"""C++ (Itanium ABI) demangling, cached.

Names in node and addons are mangled (`_ZN2v88internal4Heap11AllocateRawE...`); a
report must show `v8::internal::Heap::AllocateRaw(...)`. We call libstdc++'s own
`__cxa_demangle` through ctypes (what the PyPI `cxxfilt` package does, without the
dependency) and fall back to one batched `c++filt` process when libstdc++ cannot be
loaded. A name that does not demangle is returned unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

_impl: Any = None  # (demangle function, free function) or False when unavailable


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
    """Itanium-mangled symbol names start with _Z (or __Z on some platforms)."""
    return name.startswith("_Z") or name.startswith("__Z")


@lru_cache(maxsize=1 << 16)
def demangle(name: str) -> str:
    """Demangled `name`, or `name` itself when it is not mangled or does not demangle."""
    if not is_mangled(name):
        return name
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
