"""The compiling child, `python -m tracer.probes.bpfcompile`: bcc's compile of one
source, taken out of bcc's module as an Image (tracer/probes/bpfprog.py starts it and
caches the result; tracer/probes/bpfimage.py loads it).

A cold session starts one such child per compile unit, so what a child does besides
compiling is paid once per unit: it talks to libbcc through ctypes alone (bcc's Python
module, pyelftools and the rest of natrace are never imported here), and it answers
bcc's kernel-symbol lookup itself (_short_kallsyms).
"""

from __future__ import annotations

import base64
import ctypes as ct
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field

libbcc = ct.CDLL("libbcc.so.0", use_errno=True)
_module_create = libbcc.bpf_module_create_c_from_string
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
    getattr(libbcc, _name).restype = _restype
    getattr(libbcc, _name).argtypes = _args


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
        for i in range(libbcc.bpf_num_tables(mod)):
            name = libbcc.bpf_table_name(mod, i)
            maps.append(MapSpec(
                name.decode(), libbcc.bpf_table_fd_id(mod, i), libbcc.bpf_table_type_id(mod, i),
                libbcc.bpf_table_flags_id(mod, i), libbcc.bpf_table_max_entries_id(mod, i),
                libbcc.bpf_table_key_size_id(mod, i), libbcc.bpf_table_leaf_size_id(mod, i),
                (libbcc.bpf_table_key_desc_id(mod, i) or b"").decode(),
                (libbcc.bpf_table_leaf_desc_id(mod, i) or b"").decode(),
                [libbcc.bpf_perf_event_field(mod, name, j).decode()
                 for j in range(libbcc.bpf_perf_event_fields(mod, name))]))
        functions = {}
        for i in range(libbcc.bpf_num_functions(mod)):
            fn = libbcc.bpf_function_name(mod, i)
            functions[fn.decode()] = ct.string_at(libbcc.bpf_function_start(mod, fn),
                                                  libbcc.bpf_function_size(mod, fn))
        return Image(functions, maps, libbcc.bpf_module_license(mod).decode(),
                     libbcc.bpf_module_kern_version(mod))
    finally:
        libbcc.bpf_module_destroy(mod)


#: What bcc's compile looks up in /proc/kallsyms: bpf_probe_read_kernel, to choose
#: between it and bpf_probe_read (Linux < 5.5), and bpf_probe_read_user likewise.
#: natrace needs ring buffers (5.8): both are there. bcc skips addresses below the
#: kernel's; it uses none.
KALLSYMS_LOOKED_UP = b"".join(b"ffffffff81000000 T %s\n" % name for name in (
    b"bpf_probe_read_kernel", b"bpf_probe_read_user"))
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000


def short_kallsyms() -> None:
    """Give this compiling child a /proc/kallsyms of two lines. bcc reads the whole of
    it (~120k symbols, ~0.15 s of CPU with its name map built and freed) once per
    compile, only to learn that the kernel has bpf_probe_read_kernel; in a mount
    namespace of the child's own, a bind mount answers that for it. Without the
    privilege (no CAP_SYS_ADMIN) or a writable temporary directory, bcc reads the
    real one, as before."""
    libc = ct.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNS) != 0:
        return
    # private first: a bind mount must not propagate to the namespace natrace came from
    if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return
    try:  # no writable temporary directory (a read-only root file system): the real one
        with tempfile.NamedTemporaryFile(prefix="natrace-kallsyms-") as short:
            short.write(KALLSYMS_LOOKED_UP)
            short.flush()
            libc.mount(short.name.encode(), b"/proc/kallsyms", None, _MS_BIND, None)
    except OSError:
        pass


def main() -> int:
    """A {"text", "cflags"} request on stdin, the Image as JSON on stdout; bcc's
    complaints stay on stderr for the parent to quote."""
    request = json.load(sys.stdin)
    short_kallsyms()
    try:
        image = compile_image(request["text"], request["cflags"])
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(image.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
