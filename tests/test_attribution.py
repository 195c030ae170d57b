"""Module classes and the frame an allocation is charged to."""

from __future__ import annotations

import pytest

from tracer.model.frames import Frame
from tracer.symbols.attribution import (
    charge_frame,
    charge_frames,
    is_system_library,
    module_class,
    normalize_symbol,
    parse_charge_to,
    responsible_frame,
)


@pytest.mark.parametrize("path, cls", [
    ("/usr/lib/x86_64-linux-gnu/libpq.so.5.15", "libpq"),
    ("/usr/lib/x86_64-linux-gnu/libpq.so.5", "libpq"),
    ("/app/node_modules/libpq/build/Release/addon.node", "addon:libpq"),
    ("/app/node_modules/@scope/pkg/build/Release/binding.node", "addon:pkg"),
    ("/app/build/Release/addon.node", "addon:addon"),
    ("/x/build/Release/vault.node", "addon:vault"),
    ("/x/build/Release/vault.node (deleted)", "addon:vault"),
    ("/usr/bin/node", "node"),
    ("/usr/bin/nodejs", "node"),
    ("[jit]", "js"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "libc"),
    ("/lib/x86_64-linux-gnu/libc-2.31.so", "libc"),
    ("/lib64/ld-linux-x86-64.so.2", "ld.so"),
    ("/usr/lib/x86_64-linux-gnu/libpthread.so.0", "libc"),
    ("/usr/lib/x86_64-linux-gnu/libm.so.6", "libc"),
    ("/usr/lib/x86_64-linux-gnu/libmagic.so.1", "libmagic.so"),
    ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30", "libstdc++"),
    ("/opt/libfoo.so.1.2", "libfoo.so"),
    ("/opt/libfoo.so", "libfoo.so"),
    ("/usr/bin/python3.11", "python3.11"),
    ("[vdso]", "vdso"),
    ("", "unknown"),
])
def test_module_class(path: str, cls: str) -> None:
    assert module_class(path) == cls


@pytest.mark.parametrize("name, norm", [
    ("malloc", "malloc"),
    ("__libc_malloc", "libc_malloc"),
    ("__GI___libc_malloc", "libc_malloc"),
    ("__strdup", "strdup"),
    ("malloc@GLIBC_2.2.5", "malloc"),
    ("_int_malloc.cold", "int_malloc"),
    ("_Znwm", "operator new"),
    ("_ZnwmRKSt9nothrow_t", "operator new"),
    ("_Znam", "operator new[]"),
    ("operator new(unsigned long)", "operator new"),
    ("operator new[](unsigned long, std::nothrow_t const&)", "operator new[]"),
    ("PQconnectdb", "PQconnectdb"),
])
def test_normalize_symbol(name: str, norm: str) -> None:
    assert normalize_symbol(name) == norm


def f(symbol: str | None, module: str, offset: int = 0) -> Frame:
    return Frame(0x1000, module, offset, symbol, 0, module_class=module_class(module))


LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
STDCXX = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30"
PQ = "/usr/lib/x86_64-linux-gnu/libpq.so.5.15"
ADDON = "/app/build/Release/vault.node"
NODE = "/usr/bin/node"


def test_responsible_frame_skips_allocator_and_wrappers() -> None:
    stack = [f("malloc", LIBC), f("__strdup", LIBC), f(None, PQ, 0x1234),
             f("PQconnectdb", PQ), f("Connect", ADDON), f("v8::Function::Call", NODE)]
    assert responsible_frame(stack) == 2
    assert charge_frame(stack, "first") == 2
    assert charge_frame(stack, "module:libpq") == 2
    assert charge_frame(stack, "module:vault") == 4
    assert charge_frame(stack, "module:addon:vault") == 4
    assert charge_frame(stack, "module:vault.node") == 4
    assert charge_frame(stack, "module:node") == 5
    assert charge_frame(stack, "module:libpq.so.5.15") == 2
    assert charge_frame(stack, "module:nothere") == 2  # falls back to responsible


def test_operator_new_is_skipped_mangled_or_not() -> None:
    stack = [f("malloc", LIBC), f("operator new(unsigned long)", STDCXX), f("_Znam", STDCXX),
             f("vault::make()", ADDON)]
    assert responsible_frame(stack) == 3


def test_libc_function_that_is_not_a_wrapper_is_responsible() -> None:
    stack = [f("malloc", LIBC), f("qsort", LIBC), f("main", "/usr/bin/prog")]
    assert responsible_frame(stack) == 1
    # A malloc-named function outside libc is not the allocator.
    assert responsible_frame([f("malloc", "/opt/libmine.so")]) == 0


def test_first_charges_past_the_language_runtime() -> None:
    prog = "/usr/bin/prog"
    stack = [f("operator new(unsigned long)", STDCXX),
             f("std::string::_M_create(unsigned long&, unsigned long)", STDCXX),
             f("std::string::_M_assign(std::string const&)", STDCXX),
             f("cache_insert", prog), f("main", prog)]
    assert charge_frame(stack, "first") == 3
    assert charge_frame(stack, "module:nothere") == 3
    # the runtime's own allocations stay with the runtime
    loader = [f("malloc", LIBC), f("_dl_new_object", LIBC), f("_dl_start", LIBC)]
    assert charge_frame(loader, "first") == 1
    # an address outside every module is never charged
    assert charge_frame([f("qsort", LIBC), f(None, "")], "first") == 0
    # CPython's allocator, in the interpreter binary
    py = "/usr/bin/python3.11"
    assert charge_frame([f("_PyObject_Malloc", py), f("PyObject_Malloc", py),
                         f("list_resize", py)], "first") == 2


def test_system_library_allocations_are_charged_to_their_caller() -> None:
    """libpq's PGresult: charged to the addon function that called PQexec, held by libpq;
    a library of the program's own tree, the runtime's and --charge-to module: stay."""
    pq = [f("malloc", LIBC), f(None, PQ, 0x1234), f("PQexec", PQ), f("keep", ADDON),
          f("v8::Function::Call", NODE)]
    assert charge_frames(pq) == (3, 1)
    assert charge_frames(pq, "module:libpq") == (1, 1)
    assert charge_frames(pq, "module:node") == (4, 4)
    # system libraries in between (libffi under ctypes) are passed over, so is an
    # address outside every module; the executable is never a system library
    py = "/usr/bin/python3.11"
    ffi = "/usr/lib/x86_64-linux-gnu/libffi.so.8.1.2"
    ctypes = "/usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so"
    assert charge_frames([f("malloc", LIBC), f("PQconnectdb", PQ), f(None, ""),
                          f("ffi_call_unix64", ffi), f(None, ctypes, 0x9a0),
                          f("_PyObject_MakeTpCall", py)]) == (5, 1)
    # a library shipped with the program is its own code
    mine = "/opt/app/lib/libcache.so.1"
    assert charge_frames([f("malloc", LIBC), f("cache_put", mine), f("main", NODE)]) == (1, 1)
    # nothing of the program called it (the loader at start, a library's thread)
    ld = "/lib64/ld-linux-x86-64.so.2"
    assert charge_frames([f("malloc", LIBC), f("_dl_new_object", ld),
                          f("_dl_start", ld)]) == (1, 1)
    assert charge_frames([f("malloc", LIBC), f(None, PQ), f("start_thread", LIBC)]) == (1, 1)
    assert charge_frames([]) == (-1, -1)
    assert is_system_library(f(None, ld)) and is_system_library(f(None, ctypes))
    assert not any(is_system_library(f(None, p)) for p in (
        NODE, "/usr/lib/node_modules/pg-native/build/Release/addon.node",
        "/usr/lib/postgresql/15/bin/postgres", mine, "", "[jit]"))


def test_configurable_lists() -> None:
    stack = [f("je_malloc", "/usr/lib/libjemalloc.so.2"), f("xmalloc", "/usr/bin/prog"),
             f("main", "/usr/bin/prog")]
    assert responsible_frame(stack) == 0
    assert responsible_frame(stack, allocator_modules={"libjemalloc.so", "prog"},
                             wrapper_symbols={"je_malloc", "xmalloc"}) == 2


def test_edges() -> None:
    assert responsible_frame([]) == -1
    assert charge_frame([], "module:libpq") == -1
    only = [f("malloc", LIBC), f("calloc", LIBC)]
    assert responsible_frame(only) == 1
    assert parse_charge_to("first") is None
    assert parse_charge_to("module:libpq") == "libpq"
    for bad in ("", "module:", "last", "mod:libpq"):
        with pytest.raises(ValueError):
            parse_charge_to(bad)
