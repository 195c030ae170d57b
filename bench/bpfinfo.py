"""What the kernel knows about a loaded BPF program: BPF_OBJ_GET_INFO_BY_FD's
bpf_prog_info (verified instructions; run time and count while
kernel.bpf_stats_enabled is 1), read with ctypes so no bpftool is needed."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_NR_BPF = 321  # x86-64
_BPF_PROG_GET_NEXT_ID = 11
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15


class _ProgInfo(ctypes.Structure):
    """include/uapi/linux/bpf.h's struct bpf_prog_info up to verified_insns."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int  # BPF_PROG_TYPE_*: 2 kprobe (uprobes too), 5 tracepoint, 17 raw tracepoint
    name: str
    verified_insns: int
    xlated_insns: int
    run_time_ns: int
    run_cnt: int


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    attr = _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    if _libc.syscall(_NR_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr),
                     ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")
    return ProgInfo(info.id, info.type, info.name.decode(errors="replace"), info.verified_insns,
                    info.xlated_prog_len // 8, info.run_time_ns, info.run_cnt)


def loaded_programs() -> list[ProgInfo]:
    """Every BPF program loaded on the machine (any process's), by id."""
    out: list[ProgInfo] = []
    prog_id = 0
    while True:
        attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)  # start_id, next_id, open_flags
        if _libc.syscall(_NR_BPF, _BPF_PROG_GET_NEXT_ID, attr, ctypes.sizeof(attr)) != 0:
            return out
        prog_id = attr[1]
        fd = _libc.syscall(_NR_BPF, _BPF_PROG_GET_FD_BY_ID,
                           (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0), ctypes.sizeof(attr))
        if fd < 0:
            continue  # unloaded meanwhile
        try:
            out.append(prog_info(fd))
        finally:
            os.close(fd)
