"""Field offsets of the running kernel's structures, from its BTF (/sys/kernel/btf/vmlinux).

bcc compiles against the installed headers, which on this project's machines are an
older kernel's (6.1 headers on 6.18): a struct read through them would use the wrong
offsets. The few fields natrace reads directly (the uretprobe return instances a stack
walk must see through, a forked task's pid on the raw fork tracepoint) are looked up
here by name and passed in as -D parameters.
"""

from __future__ import annotations

import functools
import struct

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_STRUCT, _UNION = 4, 5
# bytes of kind-specific data after the 12-byte btf_type, by kind (vlen-scaled ones apart)
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}

#: (struct, field path) -> the -D name natrace's BPF C uses.
URETPROBE_FIELDS = {
    ("task_struct", "utask"): "KOFF_TASK_UTASK",
    ("uprobe_task", "return_instances"): "KOFF_UTASK_RETURN_INSTANCES",
    ("return_instance", "stack"): "KOFF_RI_STACK",
    ("return_instance", "orig_ret_vaddr"): "KOFF_RI_ORIG_RET_VADDR",
    ("return_instance", "next"): "KOFF_RI_NEXT",
}


#: What bpf/alloc.bpf.c's raw sched_process_fork reads of the child task.
TASK_FIELDS = {("task_struct", "pid"): "KOFF_TASK_PID"}


@functools.cache
def uretprobe_offsets(path: str = VMLINUX_BTF) -> dict[str, int] | None:
    """The byte offsets bpf/stacks.bpf.h needs to read pending uretprobes' original
    return addresses, as -D parameters; None when the kernel has no BTF or the fields."""
    return _offsets(URETPROBE_FIELDS, path)


@functools.cache
def task_offsets(path: str = VMLINUX_BTF) -> dict[str, int] | None:
    """TASK_FIELDS' offsets as -D parameters; None without BTF (alloc.bpf.c then takes
    forks from the perf-event tracepoint)."""
    return _offsets(TASK_FIELDS, path)


def _offsets(fields: dict[tuple[str, str], str], path: str) -> dict[str, int] | None:
    wanted = {s for s, _ in fields}
    try:
        with open(path, "rb") as fh:
            members = _struct_members(fh.read(), wanted)
    except (OSError, ValueError, struct.error, IndexError):
        return None
    out = {}
    for (name, field), define in fields.items():
        offset = members.get(name, {}).get(field)
        if offset is None:
            return None
        out[define] = offset
    return out


def _struct_members(data: bytes, wanted: set[str]) -> dict[str, dict[str, int]]:
    """struct name -> {member name: byte offset} for the named structs (first seen)."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = \
        struct.unpack_from("<HBBIIIII", data, 0)
    if magic != 0xEB9F:
        raise ValueError("not BTF")
    types = hdr_len + type_off
    strings = hdr_len + str_off

    def name(off: int) -> str:
        end = data.index(b"\0", strings + off)
        return data[strings + off:end].decode()

    found: dict[str, dict[str, int]] = {}
    pos, end = types, types + type_len
    while pos < end:
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        pos += 12
        if kind in (_STRUCT, _UNION) and name_off:
            sname = name(name_off)
            if sname in wanted and sname not in found:
                fields = {}
                for i in range(vlen):
                    m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    bits = m_off & 0xFFFFFF if kind_flag else m_off
                    if m_name:
                        fields[name(m_name)] = bits // 8
                found[sname] = fields
                if len(found) == len(wanted):
                    break  # vmlinux's core structs come first: ~1% of a 5 MB read
        pos += _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
    return found

