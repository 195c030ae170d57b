"""Which module a frame belongs to, and which frame an allocation is charged to.

A stack taken at malloc starts inside the allocator (malloc itself, strdup,
operator new, ...). Those frames are the same for every allocation and tell nothing:
the *responsible* frame is the first one outside them. Users can also charge to the
first frame in a module they care about (`--charge-to module:libpq`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from tracer.model.frames import Frame

#: Module classes whose malloc-family frames are skipped (ld.so has its own mmap and
#: minimal malloc for the libraries it loads before libc's is usable).
DEFAULT_ALLOCATOR_MODULES: frozenset[str] = frozenset({"libc", "ld.so", "libstdc++"})

#: Functions that allocate on behalf of their caller (names after `normalize_symbol`).
DEFAULT_WRAPPER_SYMBOLS: frozenset[str] = frozenset({
    # the malloc family and glibc's internal names for it
    "malloc", "calloc", "realloc", "reallocarray", "free", "memalign", "posix_memalign",
    "aligned_alloc", "valloc", "pvalloc", "libc_malloc", "libc_calloc", "libc_realloc",
    "libc_reallocarray", "libc_memalign", "libc_valloc", "libc_pvalloc", "libc_free",
    "int_malloc", "int_realloc", "int_memalign", "int_free", "mid_memalign", "sysmalloc",
    "malloc_hook_ini", "realloc_hook_ini", "memalign_hook_ini", "tcache_init",
    "malloc_consolidate", "alloc_perturb",
    # libc functions that return malloc'ed memory
    "strdup", "strndup", "wcsdup", "asprintf", "vasprintf", "asprintf_chk",
    "vasprintf_chk", "realpath", "canonicalize_file_name", "getline", "getdelim",
    "open_memstream", "open_wmemstream", "scandir", "scandir64", "get_current_dir_name",
    "getcwd", "tempnam", "libc_alloc_buffer_allocate", "libc_dynarray_emplace_enlarge",
    "libc_dynarray_resize", "libc_scratch_buffer_grow", "libc_scratch_buffer_set_array_size",
    # C++ allocation functions
    "operator new", "operator new[]",
    # the syscall wrappers behind anonymous mappings and heap growth
    "mmap", "mmap64", "munmap", "mremap", "brk", "sbrk",
})

_CLASS_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^libpq\.so(\..*)?$"), "libpq"),
    (re.compile(r"^(libc|libm|libdl|librt|libpthread)(\.so.*|-[\d.]+\.so)$"), "libc"),
    (re.compile(r"^ld-linux.*$|^ld-[\d.]+\.so$|^ld\.so.*$"), "ld.so"),
    (re.compile(r"^libstdc\+\+\.so.*$"), "libstdc++"),
    (re.compile(r"^libnatrace_sampler\.so$"), "natrace-sampler"),
]
#: natrace's in-process sampler (sampler/): every frame of it is the allocator's front,
#: so the stack its probes fire from is charged past it, like malloc's own frames.
SAMPLER_CLASS = "natrace-sampler"
_SO_VERSION = re.compile(r"\.so(\.[^/]*)?$")
_CLONE_SUFFIX = re.compile(r"\.(cold|part|isra|constprop|lto_priv|localalias)(\.\d+)*.*$")


def basename(path: str) -> str:
    """Last path component without the kernel's ` (deleted)` suffix."""
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    return path.rstrip("/").rsplit("/", 1)[-1]


_GENERIC_ADDON_STEMS = frozenset({"addon", "binding", "bindings", "index", "native", "main"})


def _addon_name(path: str, stem: str) -> str:
    """An addon's name: its file stem, or for node-gyp's generic stems
    (build/Release/addon.node) the npm package that holds it."""
    if stem not in _GENERIC_ADDON_STEMS:
        return stem
    parts = path.split("/")
    if "node_modules" in parts:
        i = len(parts) - 1 - parts[::-1].index("node_modules")
        if i + 1 < len(parts) - 1:
            pkg = parts[i + 1]
            if pkg.startswith("@") and i + 2 < len(parts) - 1:
                pkg = parts[i + 2]
            return pkg
    return stem


def module_class(path: str) -> str:
    """Attribution class of a module path.

    libpq, addon:<stem> for `*.node`, node, js ([jit]), libc (glibc), ld.so (the
    dynamic loader: the memory it maps while loading libraries is not libc's),
    libstdc++, a bracketed pseudo-mapping's name ([vdso] -> vdso), otherwise the file's
    basename with the version after `.so` cut (libfoo.so.1.2 -> libfoo.so).
    """
    if not path:
        return "unknown"
    if path == "[jit]":
        return "js"
    if path.startswith("[") and path.endswith("]"):
        return path[1:-1] or "unknown"
    name = basename(path)
    if name.startswith("memfd:"):
        name = name[len("memfd:"):]
    if name.endswith(".node"):
        return "addon:" + _addon_name(path, name[: -len(".node")])
    if name in ("node", "nodejs"):
        return "node"
    for pattern, cls in _CLASS_PATTERNS:
        if pattern.match(name):
            return cls
    return _SO_VERSION.sub(".so", name) or "unknown"


def normalize_symbol(name: str) -> str:
    """A symbol reduced to what the wrapper list names.

    Drops symbol versions (@GLIBC_2.2.5), GCC clone suffixes (.cold, .isra.0), glibc's
    internal prefixes (__GI_, __libc_ -> libc_, leading underscores) and C++ parameter
    lists; mangled operator new (_Znwm, _ZnamRKSt9nothrow_t, ...) becomes `operator new`.
    """
    name = name.split("@", 1)[0]
    name = _CLONE_SUFFIX.sub("", name)
    if name.startswith("_Znw"):
        return "operator new"
    if name.startswith("_Zna"):
        return "operator new[]"
    if name.startswith("operator new"):
        rest = name[len("operator new"):].lstrip()
        return "operator new[]" if rest.startswith("[]") else "operator new"
    if name.startswith("__GI_"):
        name = name[len("__GI_"):]
    paren = name.find("(")
    if paren > 0:
        name = name[:paren]
    return name.lstrip("_")


def is_allocator_frame(frame: Frame, allocator_modules: Collection[str] = DEFAULT_ALLOCATOR_MODULES,
                       wrapper_symbols: Collection[str] = DEFAULT_WRAPPER_SYMBOLS) -> bool:
    """Is this frame the allocator itself or a libc/libstdc++ wrapper around it?"""
    if frame.module_class == SAMPLER_CLASS:
        return True
    if not frame.symbol:
        return False
    if frame.module_class not in allocator_modules and basename(frame.module) not in \
            allocator_modules:
        return False
    return normalize_symbol(frame.symbol) in wrapper_symbols or frame.symbol in wrapper_symbols


def responsible_frame(frames: Sequence[Frame],
                      allocator_modules: Collection[str] = DEFAULT_ALLOCATOR_MODULES,
                      wrapper_symbols: Collection[str] = DEFAULT_WRAPPER_SYMBOLS) -> int:
    """Index of the first frame outside the allocator and its wrappers.

    -1 for an empty stack; the last index when every frame is an allocator frame.
    """
    for i, frame in enumerate(frames):
        if not is_allocator_frame(frame, allocator_modules, wrapper_symbols):
            return i
    return len(frames) - 1


#: glibc malloc's own functions that map memory for the allocator: arena heaps, heap
#: growth and trimming (names from libc's debug symbols).
ALLOCATOR_INTERNALS: frozenset[str] = frozenset({
    "alloc_new_heap", "new_heap", "grow_heap", "shrink_heap", "heap_trim", "sysmalloc",
    "systrim", "int_new_arena", "arena_get2", "arena_get_retry", "tcache_init",
    "malloc_consolidate", "mtrim", "munmap_chunk", "mremap_chunk",
})


#: glibc functions that map a new arena heap (a subset of ALLOCATOR_INTERNALS).
HEAP_MAKERS: frozenset[str] = frozenset({"new_heap", "alloc_new_heap", "int_new_arena",
                                         "arena_get2"})

#: glibc functions that map a new thread's stack.
THREAD_STACK_MAKERS: frozenset[str] = frozenset({"pthread_create", "allocate_stack"})


def made_by(frames: Sequence[Frame], functions: Collection[str]) -> bool:
    """Does the stack run through one of these libc functions (names normalized)?"""
    return any(f.module_class == "libc" and f.symbol
               and normalize_symbol(f.symbol) in functions for f in frames)


def made_by_allocator(frames: Sequence[Frame]) -> bool:
    """Is this mapping the allocator's own (an arena heap, heap growth)? The BPF side
    tags mappings made inside a traced malloc-family call; this also catches those
    made inside free(), whose first call on a thread sets up the thread's arena, and
    the in-process sampler's own table of sampled addresses."""
    return made_by(frames, ALLOCATOR_INTERNALS) or any(
        f.module_class == SAMPLER_CLASS for f in frames)


def parse_charge_to(spec: str) -> str | None:
    """Validate a `--charge-to` value: None for `first`, the NAME for `module:NAME`.

    Raises ValueError on anything else (the CLI turns it into a one-line error).
    """
    if spec == "first":
        return None
    if spec.startswith("module:") and spec[len("module:"):]:
        return spec[len("module:"):]
    raise ValueError(f"--charge-to must be 'first' or 'module:NAME', not {spec!r}")


def _module_matches(frame: Frame, name: str) -> bool:
    if not frame.module:
        return frame.module_class == name
    base = basename(frame.module)
    return name in (frame.module_class, base, _SO_VERSION.sub(".so", base)) or (
        frame.module_class == "addon:" + name)


#: The class of Rust's standard library code inlined into a program (the symbolizer
#: tells it by its source path, /rustc/HASH/library/...).
RUST_STD_CLASS = "rust-std"

#: Language runtimes an allocation is made *for*, never *by*: `--charge-to first` passes
#: over their frames to the code that called them (std::map's node, not _Rb_tree's).
LANGUAGE_RUNTIME_MODULES: frozenset[str] = frozenset({"libc", "libstdc++", "libgcc_s.so",
                                                      RUST_STD_CLASS})

#: CPython's allocator functions (in python3.X or libpython3.X.so): the object
#: constructor that called them is charged.
PYTHON_ALLOCATOR_SYMBOLS: frozenset[str] = frozenset({
    "PyMem_Malloc", "PyMem_Calloc", "PyMem_Realloc", "PyMem_RawMalloc", "PyMem_RawCalloc",
    "PyMem_RawRealloc", "PyObject_Malloc", "PyObject_Calloc", "PyObject_Realloc",
    "_PyMem_RawMalloc", "_PyMem_RawCalloc", "_PyMem_RawRealloc", "_PyObject_Malloc",
    "_PyObject_Calloc", "_PyObject_Realloc", "pymalloc_alloc", "pymalloc_realloc",
    "allocate_from_new_pool", "new_arena", "_PyObject_GC_Alloc", "_PyObject_GC_New",
    "_PyObject_GC_NewVar", "_PyObject_New", "_PyObject_NewVar", "PyType_GenericAlloc",
    "_PyType_AllocNoTrack", "gc_alloc", "_PyMem_DebugRawAlloc", "_PyMem_DebugMalloc",
})


_PYTHON_ALLOCATOR_NORMALIZED = frozenset(normalize_symbol(n) for n in PYTHON_ALLOCATOR_SYMBOLS)


def in_language_runtime(frame: Frame) -> bool:
    """Is this frame libc, the loader, libstdc++, libgcc or CPython's allocator?"""
    if frame.module_class in LANGUAGE_RUNTIME_MODULES:
        return True
    return (frame.module_class.startswith(("python", "libpython")) and bool(frame.symbol)
            and normalize_symbol(frame.symbol or "") in _PYTHON_ALLOCATOR_NORMALIZED)


def past_runtime(frames: Sequence[Frame], start: int) -> int:
    """The first frame from `start` on that is the program's own code (not a language
    runtime, not an address outside every module); `start` when there is none (the
    runtime's own allocations: the loader's, a thread's start)."""
    for i in range(start, len(frames)):
        if not in_language_runtime(frames[i]) and frames[i].module_class != "unknown":
            return i
    return start


#: Where the OS's packages install shared libraries (Debian's multiarch dirs included).
SYSTEM_LIBRARY_DIRS: tuple[str, ...] = ("/lib/", "/lib32/", "/lib64/", "/libx32/", "/usr/lib/",
                                        "/usr/lib32/", "/usr/lib64/", "/usr/libx32/")


def is_system_library(frame: Frame) -> bool:
    """Is the frame in a shared library the OS installed (libpq, libssl, libuv, ld.so,
    CPython's lib-dynload modules)? The executable and addons (`*.node`, no `.so` in
    their name) never are, wherever they live; nor is a library of the program's own
    tree (/opt/app/lib/libfoo.so)."""
    path = frame.module
    return path.startswith(SYSTEM_LIBRARY_DIRS) and bool(_SO_VERSION.search(basename(path)))


def library_caller(frames: Sequence[Frame], holder: int) -> int:
    """Where an allocation by a system library's code (frame `holder`) is charged: the
    first frame after it in the program's own code (not a system library, not a
    language runtime, not outside every module), so libpq's PGresult is charged to
    the addon function that called PQexec while the site stays libpq's in the module
    table. `holder` itself when it is the program's own code or the runtime's, or when
    no frame of the program called it (a library's own thread, the loader at start)."""
    if holder < 0 or not is_system_library(frames[holder]) or in_language_runtime(frames[holder]):
        return holder
    for i in range(holder + 1, len(frames)):
        f = frames[i]
        if f.module_class != "unknown" and not is_system_library(f) and not in_language_runtime(f):
            return i
    return holder


def charge_frames(frames: Sequence[Frame], charge_to: str = "first",
                  allocator_modules: Collection[str] = DEFAULT_ALLOCATOR_MODULES,
                  wrapper_symbols: Collection[str] = DEFAULT_WRAPPER_SYMBOLS) -> tuple[int, int]:
    """(call site, holder): the frame an allocation is charged to and the frame whose
    module holds the bytes (the module table's). They differ only under `first`, for
    an allocation a system library made for the program (`library_caller`)."""
    holder = charge_frame(frames, charge_to, allocator_modules, wrapper_symbols)
    if parse_charge_to(charge_to) is not None:
        return holder, holder
    return library_caller(frames, holder), holder


def charge_frame(frames: Sequence[Frame], charge_to: str = "first",
                 allocator_modules: Collection[str] = DEFAULT_ALLOCATOR_MODULES,
                 wrapper_symbols: Collection[str] = DEFAULT_WRAPPER_SYMBOLS) -> int:
    """Index of the frame an allocation is charged to under `--charge-to`.

    `first`: the first frame outside the allocator and the language runtime (the
    runtime function it called shows as the site's `via`). `module:NAME`: the first
    frame at or after the one outside the allocator whose module class or basename is
    NAME (libpq, addon:vault, vault, libfoo.so, libfoo.so.1), else the `first` frame.
    """
    want = parse_charge_to(charge_to)
    start = responsible_frame(frames, allocator_modules, wrapper_symbols)
    if start < 0:
        return start
    if want is None:
        return past_runtime(frames, start)
    for i in range(start, len(frames)):
        if _module_matches(frames[i], want):
            return i
    return past_runtime(frames, start)


#: Module classes a lock wait, syscall or page fault is never charged to: libc (which
#: holds pthread since glibc 2.34), the loader and libstdc++ (std::mutex & co.), and
#: Rust's std inlined into a program (std::sync::Mutex).
RUNTIME_MODULES: frozenset[str] = frozenset({"libc", "ld.so", "libstdc++", RUST_STD_CLASS})


def first_frame_outside(frames: Sequence[Frame],
                        modules: Collection[str] = RUNTIME_MODULES) -> int:
    """Index of the first frame whose module class is not in `modules`: the program's
    call site of a libc function. -1 for an empty stack; the last index when all are."""
    for i, frame in enumerate(frames):
        if frame.module_class not in modules:
            return i
    return len(frames) - 1
