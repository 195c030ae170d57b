"""Compiled BPF programs as data, loaded again without a compiler.

bcc 0.26 loads only what it compiles itself, in process, with LLVM: about 1 s and
tens of MiB of heap per program, every run. An Image is what one compile produced,
taken out of bcc's module: each function's instructions (map references are the
compiling process's map fds, in BPF_PSEUDO_MAP_FD loads) and each map's type,
sizes and C type descriptions. Loading an Image creates the maps afresh, points the
instructions at them and loads the programs; the object returned is bcc's own BPF
class, so tables, ring buffers, attaching and detaching are bcc's code as before.

Uprobes are attached as uprobe_multi links (BPF_LINK_CREATE, Linux >= 6.6) where the
kernel has them: a perf-event uprobe's open and close take the kernel's event_mutex,
and every other tracer tearing its probes down holds that mutex across an RCU grace
period per probe (seconds on a shared machine). A link takes no such lock; programs
for it are loaded with their expected attach type, so every uprobe-type program of an
Image is loaded that way (tail calls need one type) and bcc's perf path is the fallback.

Programs entered only by tail calls (bpf/stacks.bpf.h's stack walk and its
continuations) are named tail_ARRAY__SLOT__what: loaded as ARRAY's program type
(kp: kprobe, for uprobes; tp: raw tracepoint, for kernel events, which natrace takes
from raw tracepoints: see bpf/target.bpf.h) and put in slot SLOT of the program array
named tail_ARRAY before anything is attached.
"""

from __future__ import annotations

import ctypes as ct
import errno
import functools
import json
import os
import re
import signal
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import bcc
import bcc.table

from tracer.probes.bpfcompile import Image, MapSpec
from tracer.probes.bpfcompile import libbcc as _libbcc
from tracer.probes.doctor import BPF_SYSCALL_NR

_TRACEPOINT_PREFIX = "tracepoint__"
_RAW_TRACEPOINT_PREFIX = "raw_tracepoint__"
_TAIL = re.compile(r"(tail_(kp|tp))__(\d+)__\w+")
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_INSN = struct.Struct("<BBhi")
_NR_BPF = BPF_SYSCALL_NR.get(os.uname().machine, 321)
_BPF_MAP_CREATE = 0
_BPF_MAP_DELETE_ELEM = 3
_BPF_PROG_LOAD = 5
_BPF_BTF_LOAD = 18
_BPF_LINK_CREATE = 28
_MAP_TYPE_TASK_STORAGE = 29
_MAP_CREATE_ATTR = struct.Struct("<IIIIIII16sIIII")  # union bpf_attr, BPF_MAP_CREATE
_BTF_LOAD_ATTR = struct.Struct("<QQIII")
_BTF_KIND_INT, _BTF_KIND_ARRAY = 1, 3
_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
_UPROBE_MULTI_RETURN = 1
_PROG_LOAD_ATTR = struct.Struct("<IIQQIIQII16sII")  # union bpf_attr, BPF_PROG_LOAD
_LINK_CREATE_ATTR = struct.Struct("<IIIIQQQQIII4x")  # BPF_LINK_CREATE, uprobe_multi
_LOG_SIZE = 1 << 22
_syscall = ct.CDLL(None, use_errno=True).syscall
_syscall.restype = ct.c_long

# Separate prototypes on the same library: bcc's `lib` object stays as bcc set it.
_attach_uprobe = _libbcc.bpf_attach_uprobe
_attach_uprobe.restype = ct.c_int
_attach_uprobe.argtypes = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_ulonglong,
                           ct.c_int, ct.c_uint32]
_create_map = _libbcc.bcc_create_map
_create_map.restype = ct.c_int
_create_map.argtypes = [ct.c_int, ct.c_char_p, ct.c_int, ct.c_int, ct.c_int, ct.c_int]
_prog_load = _libbcc.bcc_prog_load
_prog_load.restype = ct.c_int
_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_void_p, ct.c_int, ct.c_char_p, ct.c_uint,
                       ct.c_int, ct.c_char_p, ct.c_uint]
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


def _bpf(cmd: int, attr: bytes) -> int:
    """The bpf(2) system call: its result, or -1 with errno set."""
    buf = ct.create_string_buffer(attr, len(attr))
    return int(_syscall(_NR_BPF, cmd, buf, len(attr)))


def _load_program(kind: int, name: str, code: bytes, license: bytes, kern_version: int,
                  expected_attach_type: int, log: bool = True) -> int:
    """BPF_PROG_LOAD with an expected attach type (bcc's loader cannot pass one): the
    program's fd, or -1 with errno set and (`log`) the verifier's log on stderr, as
    bcc's loader leaves it."""
    insns = ct.create_string_buffer(code, len(code))
    lic = ct.create_string_buffer(license)

    def load(log_buf: Any) -> int:
        size = len(log_buf) if log_buf is not None else 0
        attr = _PROG_LOAD_ATTR.pack(
            kind, len(code) // 8, ct.addressof(insns), ct.addressof(lic), 1 if size else 0,
            size, ct.addressof(log_buf) if size else 0, kern_version, 0, name[:15].encode(),
            0, expected_attach_type)
        return _bpf(_BPF_PROG_LOAD, attr)

    fd = load(None)
    if fd >= 0 or not log:
        return fd
    log_buf = ct.create_string_buffer(_LOG_SIZE)
    fd = load(log_buf)
    err = ct.get_errno()
    if fd < 0:
        os.write(2, log_buf.value + f"\nbpf: Failed to load program {name}: "
                 f"{os.strerror(err)}\n".encode())
        ct.set_errno(err)
    return fd


def _storage_btf(value_size: int) -> int:
    """A BTF object for a task-storage map, which the kernel creates only with key and
    value types (bcc's map creation passes none): [1] int, the key; [3] the value as
    value_size bytes. Its fd, or -1 with errno set."""
    strings = b"\0int\0unsigned char\0"
    types = (struct.pack("<IIII", 1, _BTF_KIND_INT << 24, 4, 1 << 24 | 32)  # signed, 32 bits
             + struct.pack("<IIII", 5, _BTF_KIND_INT << 24, 1, 8)
             + struct.pack("<IIIIII", 0, _BTF_KIND_ARRAY << 24, 0, 2, 1, value_size))
    header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    blob = ct.create_string_buffer(header + types + strings)
    return _bpf(_BPF_BTF_LOAD, _BTF_LOAD_ATTR.pack(ct.addressof(blob), 0, len(blob) - 1, 0, 0))


def _create_task_storage(spec: MapSpec) -> int:
    """A task-storage map (a value per thread, found through the task): its fd, or -1
    with errno set."""
    btf = _storage_btf(spec.leaf_size)
    if btf < 0:
        return btf
    try:
        return _bpf(_BPF_MAP_CREATE, _MAP_CREATE_ATTR.pack(
            spec.type, spec.key_size, spec.leaf_size, 0, spec.flags, 0, 0,
            spec.name[:15].encode(), 0, btf, 1, 3))
    finally:
        err = ct.get_errno()
        os.close(btf)
        ct.set_errno(err)


def attach_perf_uprobe(bpf: Any, fn_name: Any, path: Any, offset: int, pid: int,
                       retprobe: bool, ref_ctr_offset: int | None = 0) -> None:
    """A uprobe at a file offset as a perf event, for any bcc BPF object. None for
    `ref_ctr_offset`: bcc's own call, whose semaphore offset is what its stack holds
    (see LoadedBPF.attach_uprobe_at)."""
    fn_name = fn_name.encode() if isinstance(fn_name, str) else fn_name
    path = path.encode() if isinstance(path, str) else path
    fd = bpf.load_func(fn_name, bcc.BPF.KPROBE).fd
    ev_name = bpf._get_uprobe_evname(b"r" if retprobe else b"p", path, offset, pid)
    if ref_ctr_offset is None:
        perf = bcc.lib.bpf_attach_uprobe(fd, int(retprobe), ev_name, path, offset, pid)
    else:
        perf = _attach_uprobe(fd, int(retprobe), ev_name, path, offset, pid, ref_ctr_offset)
    if perf < 0:
        raise OSError(ct.get_errno(), f"cannot attach a uprobe at {path.decode()}+{offset:#x}")
    bpf._add_uprobe_fd(ev_name, perf)


@dataclass(frozen=True)
class _Placement:
    """One uprobe_multi link's arguments: what making it again takes."""

    prog_fd: int
    path: bytes
    offset: int
    pid: int  # the process it filters on (-1: every process)
    ref_ctr_offset: int
    retprobe: bool

    def link(self) -> int:
        """A link of this probe: its fd, or -1 with errno set."""
        return _uprobe_link(self.prog_fd, self.path, self.offset, self.pid,
                            self.ref_ctr_offset, self.retprobe)


def _uprobe_link(prog_fd: int, path: bytes, offset: int, pid: int, ref_ctr_offset: int,
                 retprobe: bool) -> int:
    """A uprobe_multi link of one probe: its fd, or -1 with errno set."""
    c_path = ct.create_string_buffer(path)
    offsets = (ct.c_uint64 * 1)(offset)
    ref_ctrs = (ct.c_uint64 * 1)(ref_ctr_offset)
    attr = _LINK_CREATE_ATTR.pack(
        prog_fd, 0, _TRACE_UPROBE_MULTI, 0, ct.addressof(c_path), ct.addressof(offsets),
        ct.addressof(ref_ctrs), 0, 1, _UPROBE_MULTI_RETURN if retprobe else 0, max(pid, 0))
    return _bpf(_BPF_LINK_CREATE, attr)


@functools.cache
def uprobe_multi_supported() -> bool:
    """Does this kernel have uprobe_multi links? Asked as libbpf does: a probe on "/"
    must fail with EBADF (not a regular file) rather than EINVAL (unknown attach)."""
    exit0 = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit
    prog = _load_program(bcc.BPF.KPROBE, "natrace_probe", exit0, b"GPL", 0,
                         _TRACE_UPROBE_MULTI, log=False)
    if prog < 0:
        return False
    try:
        link = _uprobe_link(prog, b"/", 0, 0, 0, False)
        err = ct.get_errno()
        if link >= 0:
            os.close(link)
        return link < 0 and err == 9  # EBADF
    finally:
        os.close(prog)


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


def _no_signals() -> None:
    """A loading thread blocks every signal: the verifier gives up (EAGAIN) on a
    pending one, and natrace's launched target stopping at its gate, or a compile or
    `ld.so --list` child exiting, sent SIGCHLD to it mid-load (3 loads in 8 `natrace
    run -- true`, each then compiled afresh: +3-5 s). Python runs its handlers on the
    main thread, which still takes every signal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def _spec(image: Image, name: bytes | str) -> MapSpec:
    return image.maps[image.map_index(name)]


if not isinstance(bcc.table.lib, _ImageAwareLib):
    bcc.table.lib = _ImageAwareLib(bcc.table.lib)


class LoadedBPF(bcc.BPF):
    """bcc's BPF object over an Image's freshly created maps and loaded programs.

    Sets what bcc.BPF.__init__ sets but compiles nothing; tracepoint__* functions are
    attached by attach_tracepoint_functions(), once the caller has set its maps up."""

    def __init__(self, image: Image, shared: dict[str, int] | None = None,
                 wait: bool = True) -> None:
        """`shared`: maps by name to take from another loaded program (a dup of its fd)
        instead of creating, so two programs read one table. `wait=False` returns once
        the maps exist, the programs still being verified on worker threads: finish()
        waits for them (a session's probe sets are verified side by side so)."""
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
        self._links: list[int] = []  # uprobe_multi links
        self._placed: dict[int, _Placement] = {}  # link fd -> how it was made
        self._loading: list[Future[None]] = []  # program loads finish() waits for
        self._multi = uprobe_multi_supported()
        try:
            fds = {}
            for spec in image.maps:
                if shared and spec.name in shared:
                    fd = os.dup(shared[spec.name])
                elif spec.type == _MAP_TYPE_TASK_STORAGE:
                    fd = _create_task_storage(spec)
                else:
                    fd = _create_map(spec.type, spec.name.encode(), spec.key_size,
                                     spec.leaf_size, spec.max_entries, spec.flags)
                if fd < 0:
                    raise OSError(ct.get_errno(), f"cannot create the BPF map {spec.name}: "
                                  f"{os.strerror(ct.get_errno())}")
                self._map_fds.append(fd)
                fds[spec.fd] = fd
            # The kernel verifies each program in the loading thread (~0.1 s for one
            # that walks CFI stacks): load them side by side, the longest first.
            jobs = sorted(image.functions.items(), key=lambda item: -len(item[1]))
            pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                      initializer=_no_signals)
            self._loading = [pool.submit(self._load_function, name, _relocated(code, fds))
                             for name, code in jobs]
            pool.shutdown(wait=False)  # its threads end with the last load
            if wait:
                self.finish()
        except BaseException:
            self.close()
            raise

    def finish(self) -> None:
        """Wait until every program is loaded, then fill the tail-call arrays. The first
        refusal is raised (OSError), and this object closed."""
        try:
            for job in self._loading:
                job.result()
            self._loading = []
            for name in self._image.functions:
                tail = _TAIL.fullmatch(name)
                if tail:
                    self.get_table(tail.group(1))[int(tail.group(3))] = \
                        self.funcs[name.encode()].fd
        except BaseException:
            self.close()
            raise

    def _load_function(self, name: str, code: bytes) -> None:
        tail = _TAIL.fullmatch(name)
        if tail and tail.group(2) == "tp" or name.startswith(_RAW_TRACEPOINT_PREFIX):
            kind = bcc.BPF.RAW_TRACEPOINT
        elif name.startswith(_TRACEPOINT_PREFIX):
            kind = bcc.BPF.TRACEPOINT
        else:
            kind = bcc.BPF.KPROBE
        if kind == bcc.BPF.KPROBE and self._multi:
            fd = _load_program(kind, name, code, self._image.license.encode(),
                               self._image.kern_version, _TRACE_UPROBE_MULTI)
        else:
            buf = ct.create_string_buffer(code, len(code))
            fd = _prog_load(kind, name.encode(), buf, len(code), self._image.license.encode(),
                            self._image.kern_version, 0, None, 0)
        if fd < 0:
            err = ct.get_errno()
            raise OSError(err, f"the kernel refused the BPF program {name}: {os.strerror(err)}")
        self.funcs[name.encode()] = bcc.BPF.Function(self, name.encode(), fd)

    def has_map(self, name: str) -> bool:
        return any(spec.name == name for spec in self._image.maps)

    def attach_tracepoint_functions(self, skip: tuple[bytes, ...] = ()) -> None:
        """What bcc does at load for tracepoint__CATEGORY__EVENT and
        raw_tracepoint__EVENT functions (but those in `skip`)."""
        for name in self._image.functions:
            if name.encode() in skip:
                continue
            if name.startswith(_TRACEPOINT_PREFIX):
                tp = name[len(_TRACEPOINT_PREFIX):].replace("__", ":")
                self.attach_tracepoint(tp=tp.encode(), fn_name=name.encode())
            elif name.startswith(_RAW_TRACEPOINT_PREFIX):
                self.attach_raw_tracepoint(tp=name[len(_RAW_TRACEPOINT_PREFIX):].encode(),
                                           fn_name=name.encode())

    def attach_uprobe(self, name: Any = b"", sym: Any = b"", sym_re: Any = b"",
                      addr: int | None = None, fn_name: Any = b"", pid: int = -1,
                      sym_off: int = 0) -> Any:
        """bcc's attach_uprobe (sym or addr, not sym_re), as a uprobe_multi link when the
        kernel has them."""
        path, offset = bcc.BPF._check_path_symbol(_bytes(name), _bytes(sym), addr, pid,
                                                  sym_off)
        self.attach_uprobe_at(fn_name, path, offset, pid)
        return self

    def attach_uretprobe(self, name: Any = b"", sym: Any = b"", sym_re: Any = b"",
                         addr: int | None = None, fn_name: Any = b"", pid: int = -1) -> Any:
        path, offset = bcc.BPF._check_path_symbol(_bytes(name), _bytes(sym), addr, pid)
        self.attach_uprobe_at(fn_name, path, offset, pid, retprobe=True)
        return self

    def attach_uprobe_at(self, fn_name: Any, path: Any, offset: int, pid: int,
                         ref_ctr_offset: int = 0, retprobe: bool = False) -> None:
        """A uprobe (or uretprobe) at a file offset, for `pid` (-1: every process). A
        USDT semaphore at `ref_ctr_offset` is counted in by the kernel while the probe
        is attached and out when it is closed, even if natrace dies.

        A uprobe_multi link where the kernel has them, else a perf event. The kernel
        refuses (EINVAL) a second probe on one instruction that counts another
        semaphore: bcc 0.26's Python attach_uprobe passes libbcc no ref_ctr_offset
        argument, so the one bcc tools place counts whatever was on the stack (0x6
        here). Beside such a probe natrace's goes through bcc's call too (a perf
        event, taking event_mutex), so both tools trace; so does every probe without a
        semaphore on a kernel without uprobe_multi links."""
        fn_name = fn_name.encode() if isinstance(fn_name, str) else fn_name
        path = path.encode() if isinstance(path, str) else path
        fd = self.funcs[fn_name].fd
        if self._multi:
            placed = _Placement(fd, path, offset, pid, ref_ctr_offset, retprobe)
            link = placed.link()
            if link >= 0:
                self._links.append(link)
                self._placed[link] = placed
                return
            if ct.get_errno() != errno.EINVAL:
                raise OSError(ct.get_errno(), f"cannot attach a uprobe at {path.decode()}+"
                              f"{offset:#x}: {os.strerror(ct.get_errno())}")
        attach_perf_uprobe(self, fn_name, path, offset, pid, retprobe, ref_ctr_offset or None)

    def links_of_gone_tasks(self, pid: int) -> list[int]:
        """`pid`'s uprobe links whose task is gone (their fdinfo's pid reads 0). The kernel
        filters a link by the task it was made for; when a thread other than the main
        one execs, it takes over the process's pid and the main thread's task dies in
        the exec (de_thread): those links never fire again."""
        gone = []
        for fd in [fd for fd in self._links if self._placed[fd].pid == pid]:
            try:
                with open(f"/proc/self/fdinfo/{fd}") as fh:
                    if re.search(r"^pid:\s+0$", fh.read(), re.MULTILINE):
                        gone.append(fd)
            except OSError:
                continue
        return gone

    def replace_links_of_gone_tasks(self, pid: int) -> int:
        """Make `pid`'s links whose task is gone again, for the task that holds the pid
        now (after an exec from another thread, the one that exec'd), each before its
        old one is closed; how many could not be (the kernel refused: kept, dead)."""
        failed = 0
        for old in self.links_of_gone_tasks(pid):
            placed = self._placed[old]
            new = placed.link()
            if new < 0:
                failed += 1
                continue
            self._links[self._links.index(old)] = new
            self._placed[new] = self._placed.pop(old)
            os.close(old)
        return failed

    def probe_fds(self) -> list[int]:
        """Every attached probe's fd (perf events and links)."""
        return [*self.uprobe_fds.values(), *self.tracepoint_fds.values(),
                *self.raw_tracepoint_fds.values(), *self._links]

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

    def delete_task_storage(self, name: str, pid: int) -> None:
        """Drop the value task-storage map `name` holds for thread `pid` (its key from
        user space is a pidfd), if it has one."""
        fd = self._map_fds[self._image.map_index(name)]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone: its storage went with it
        key = ct.c_int(pidfd)
        try:
            _bpf(_BPF_MAP_DELETE_ELEM, struct.pack("<I4xQQQ", fd, ct.addressof(key), 0, 0))
        finally:
            os.close(pidfd)

    def close(self) -> None:
        for job in self._loading:  # no fd is closed under a load that still runs
            job.cancel()
        wait(self._loading)
        self._loading = []
        for fd in self._links:
            os.close(fd)
        self._links = []
        self._placed = {}
        for fn in self.funcs.values():
            os.close(fn.fd)
        self.funcs = {}
        for fd in self._map_fds:
            os.close(fd)
        self._map_fds = []
        self.module = None


def _bytes(text: str | bytes) -> bytes:
    """bcc 0.26 takes names as bytes (str works, with a DeprecationWarning each time)."""
    return text.encode() if isinstance(text, str) else text
