"""Compiled BPF programs as data, loaded again without a compiler.

bcc 0.26 loads only what it compiles itself, in process, with LLVM: about 1 s and
tens of MiB of heap per program, every run. An Image is what one compile produced,
taken out of bcc's module: each function's instructions (map references are the
compiling process's map fds, in BPF_PSEUDO_MAP_FD loads) and each map's type,
sizes and C type descriptions. Loading an Image creates the maps afresh, points the
instructions at them and loads the programs; the object returned is bcc's own BPF
class, so tables, ring buffers, attaching and detaching are bcc's code as before.

Programs entered only by tail calls (bpf/stacks.bpf.h's stack walk and its
continuations) are named tail_ARRAY__SLOT__what: loaded as ARRAY's program type
(kp: kprobe, for uprobes; tp: tracepoint) and put in slot SLOT of the program array
named tail_ARRAY before anything is attached.
"""

from __future__ import annotations

import base64
import ctypes as ct
import json
import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import bcc
import bcc.table

_TRACEPOINT_PREFIX = "tracepoint__"
_TAIL = re.compile(r"(tail_(kp|tp))__(\d+)__\w+")
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")

# Separate prototypes on the same library: bcc's `lib` object stays as bcc set it.
_libbcc = ct.CDLL("libbcc.so.0", use_errno=True)
_create_map = _libbcc.bcc_create_map
_create_map.restype = ct.c_int
_create_map.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
_prog_load = _libbcc.bcc_prog_load
_prog_load.restype = ct.c_int
_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int, ct.c_char_p, ct.c_uint,
                       ct.c_int, ct.c_char_p, ct.c_uint]
_module_create = _libbcc.bpf_module_create_c_from_string
_module_create.restype = ct.c_void_p
_module_create.argtypes = [ct.c_char_p, ct.c_uint, ct.POINTER(ct.c_char_p), ct.c_int,
                           ct.c_bool, ct.c_char_p]
for _name, _restype, _args in [
    ("bpf_num_tables", ct.c_ulonglong, [ct.c_void_p]),
    ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_type_id", ct.c_int, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_flags_id", ct.c_uint, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_max_entries_id", ct.c_ulonglong, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_key_size_id", ct.c_size_t, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_leaf_size_id", ct.c_size_t, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_key_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_table_leaf_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_num_functions", ct.c_ulonglong, [ct.c_void_p]),
    ("bpf_function_name", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
    ("bpf_function_start", ct.c_void_p, [ct.c_void_p, ct.c_char_p]),
    ("bpf_function_size", ct.c_size_t, [ct.c_void_p, ct.c_char_p]),
    ("bpf_module_license", ct.c_char_p, [ct.c_void_p]),
    ("bpf_module_kern_version", ct.c_uint, [ct.c_void_p]),
    ("bpf_perf_event_fields", ct.c_ulonglong, [ct.c_void_p, ct.c_char_p]),
    ("bpf_perf_event_field", ct.c_char_p, [ct.c_void_p, ct.c_char_p, ct.c_ulonglong]),
    ("bpf_module_destroy", None, [ct.c_void_p]),
]:
    getattr(_libbcc, _name).restype = _restype
    getattr(_libbcc, _name).argtypes = _args


@dataclass(frozen=True)
class MapSpec:
    name: str
    fd: int  # in the compiling process: what the instructions refer to
    type: int
    flags: int
    max_entries: int
    key_size: int
    leaf_size: int
    key_desc: str
    leaf_desc: str
    event_fields: list[str] = field(default_factory=list)  # ring buffers: "name#type"


@dataclass(frozen=True)
class Image:
    functions: dict[str, bytes]
    maps: list[MapSpec]
    license: str
    kern_version: int

    def to_json(self) -> str:
        doc = asdict(self)
        doc["functions"] = {k: base64.b64encode(v).decode() for k, v in self.functions.items()}
        return json.dumps(doc)

    def map_index(self, name: bytes | str) -> int:
        name = name.decode() if isinstance(name, bytes) else name
        for i, spec in enumerate(self.maps):
            if spec.name == name:
                return i
        raise KeyError(name)

    @classmethod
    def from_json(cls, text: str) -> Image:
        doc = json.loads(text)
        return cls({k: base64.b64decode(v) for k, v in doc["functions"].items()},
                   [MapSpec(**m) for m in doc["maps"]], doc["license"], doc["kern_version"])


def compile_image(text: str, cflags: list[str]) -> Image:
    """Compile with bcc (clang and LLVM in this process) and take the result out.
    Raises RuntimeError when bcc refuses (its reasons are on stderr)."""
    args = (ct.c_char_p * len(cflags))(*[f.encode() for f in cflags])
    mod = _module_create(text.encode(), 0, args, len(cflags), True, None)
    if not mod:
        raise RuntimeError("bcc could not compile the program")
    try:
        maps = []
        for i in range(_libbcc.bpf_num_tables(mod)):
            name = _libbcc.bpf_table_name(mod, i)
            maps.append(MapSpec(
                name.decode(), _libbcc.bpf_table_fd_id(mod, i), _libbcc.bpf_table_type_id(mod, i),
                _libbcc.bpf_table_flags_id(mod, i), _libbcc.bpf_table_max_entries_id(mod, i),
                _libbcc.bpf_table_key_size_id(mod, i), _libbcc.bpf_table_leaf_size_id(mod, i),
                (_libbcc.bpf_table_key_desc_id(mod, i) or b"").decode(),
                (_libbcc.bpf_table_leaf_desc_id(mod, i) or b"").decode(),
                [_libbcc.bpf_perf_event_field(mod, name, j).decode()
                 for j in range(_libbcc.bpf_perf_event_fields(mod, name))]))
        functions = {}
        for i in range(_libbcc.bpf_num_functions(mod)):
            fn = _libbcc.bpf_function_name(mod, i)
            functions[fn.decode()] = ct.string_at(_libbcc.bpf_function_start(mod, fn),
                                                  _libbcc.bpf_function_size(mod, fn))
        return Image(functions, maps, _libbcc.bpf_module_license(mod).decode(),
                     _libbcc.bpf_module_kern_version(mod))
    finally:
        _libbcc.bpf_module_destroy(mod)


def _relocated(code: bytes, fds: dict[int, int]) -> bytes:
    """`code` with every map fd of the compiling process replaced by ours."""
    out = bytearray(code)
    for at in range(0, len(out) - 15, 8):
        op, regs, off, imm = _INSN.unpack_from(out, at)
        if op == _LD_IMM64 and regs >> 4 == _PSEUDO_MAP_FD:
            if imm not in fds:
                raise ValueError(f"instruction {at // 8} refers to an unknown map fd {imm}")
            _INSN.pack_into(out, at, op, regs, off, fds[imm])
    return bytes(out)


class _ImageAwareLib:
    """bcc.table's `lib`: the questions bcc's table classes ask the compiled module
    (a map's type, flags, size; a ring buffer's event fields) are answered from the
    Image when the module is one; everything else goes to libbcc."""

    _ANSWERS: dict[str, Callable[..., Any]] = {
        "bpf_table_type_id": lambda img, i: img.maps[i].type,
        "bpf_table_flags_id": lambda img, i: img.maps[i].flags,
        "bpf_table_max_entries_id": lambda img, i: img.maps[i].max_entries,
        "bpf_perf_event_fields": lambda img, name: len(_spec(img, name).event_fields),
        "bpf_perf_event_field": lambda img, name, j: _spec(img, name).event_fields[j].encode(),
    }

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._real, name)
        answer = self._ANSWERS.get(name)
        if answer is None:
            value = real
        else:
            def value(module: Any, *args: Any) -> Any:
                return answer(module, *args) if isinstance(module, Image) else real(module, *args)
        setattr(self, name, value)
        return value


def _spec(image: Image, name: bytes | str) -> MapSpec:
    return image.maps[image.map_index(name)]


if not isinstance(bcc.table.lib, _ImageAwareLib):
    bcc.table.lib = _ImageAwareLib(bcc.table.lib)


class LoadedBPF(bcc.BPF):
    """bcc's BPF object over an Image's freshly created maps and loaded programs.

    Sets what bcc.BPF.__init__ sets but compiles nothing; tracepoint__* functions are
    attached by attach_tracepoint_functions(), once the caller has set its maps up."""

    def __init__(self, image: Image, shared: dict[str, int] | None = None) -> None:
        """`shared`: maps by name to take from another loaded program (a dup of its fd)
        instead of creating, so two programs read one table."""
        self.kprobe_fds: dict[Any, Any] = {}
        self.uprobe_fds: dict[Any, Any] = {}
        self.tracepoint_fds: dict[Any, Any] = {}
        self.raw_tracepoint_fds: dict[Any, Any] = {}
        self.kfunc_entry_fds: dict[Any, Any] = {}
        self.kfunc_exit_fds: dict[Any, Any] = {}
        self.lsm_fds: dict[Any, Any] = {}
        self.perf_buffers: dict[Any, Any] = {}
        self.open_perf_events: dict[Any, Any] = {}
        self._ringbuf_manager = None
        self.tracefile = None
        self.debug = 0
        self.funcs: dict[bytes, Any] = {}
        self.tables: dict[bytes, Any] = {}
        self.module: Image | None = image  # what bcc.table asks about maps (see _ImageAwareLib)
        self._image = image
        self._map_fds: list[int] = []
        try:
            fds = {}
            for spec in image.maps:
                if shared and spec.name in shared:
                    fd = os.dup(shared[spec.name])
                else:
                    fd = _create_map(spec.type, spec.name.encode(), spec.key_size,
                                     spec.leaf_size, spec.max_entries, spec.flags)
                if fd < 0:
                    raise OSError(ct.get_errno(), f"cannot create the BPF map {spec.name}: "
                                  f"{os.strerror(ct.get_errno())}")
                self._map_fds.append(fd)
                fds[spec.fd] = fd
            # The kernel verifies each program in the loading thread (~1 s for one
            # that walks CFI stacks): load them side by side, the longest first.
            jobs = sorted(image.functions.items(), key=lambda item: -len(item[1]))
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                for done in [pool.submit(self._load_function, name, _relocated(code, fds))
                             for name, code in jobs]:
                    done.result()
            for name in image.functions:
                tail = _TAIL.fullmatch(name)
                if tail:
                    self.get_table(tail.group(1))[int(tail.group(3))] = \
                        self.funcs[name.encode()].fd
        except BaseException:
            self.close()
            raise

    def _load_function(self, name: str, code: bytes) -> None:
        tail = _TAIL.fullmatch(name)
        tracepoint = tail.group(2) == "tp" if tail else name.startswith(_TRACEPOINT_PREFIX)
        kind = bcc.BPF.TRACEPOINT if tracepoint else bcc.BPF.KPROBE
        buf = ct.create_string_buffer(code, len(code))
        fd = _prog_load(kind, name.encode(), buf, len(code), self._image.license.encode(),
                        self._image.kern_version, 0, None, 0)
        if fd < 0:
            err = ct.get_errno()
            raise OSError(err, f"the kernel refused the BPF program {name}: {os.strerror(err)}")
        self.funcs[name.encode()] = bcc.BPF.Function(self, name.encode(), fd)

    def attach_tracepoint_functions(self) -> None:
        """What bcc does at load for tracepoint__CATEGORY__EVENT functions."""
        for name in self._image.functions:
            if name.startswith(_TRACEPOINT_PREFIX):
                tp = name[len(_TRACEPOINT_PREFIX):].replace("__", ":")
                self.attach_tracepoint(tp=tp, fn_name=name)

    def get_table(self, name: Any, keytype: Any = None, leaftype: Any = None,
                  reducer: Any = None) -> Any:
        name = name.encode() if isinstance(name, str) else name
        i = self._image.map_index(name)
        spec = self._image.maps[i]
        if keytype is None and spec.key_desc:
            keytype = bcc.BPF._decode_table_type(json.loads(spec.key_desc))
        if leaftype is None and spec.leaf_desc:
            leaftype = bcc.BPF._decode_table_type(json.loads(spec.leaf_desc))
        return bcc.table.Table(self, i, self._map_fds[i], keytype, leaftype, name,
                               reducer=reducer)

    def close(self) -> None:
        for fn in self.funcs.values():
            os.close(fn.fd)
        self.funcs = {}
        for fd in self._map_fds:
            os.close(fd)
        self._map_fds = []
        self.module = None
