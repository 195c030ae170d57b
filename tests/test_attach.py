"""How natrace's probes are attached: raw tracepoints and uprobe_multi links, never a
perf event (whose open and close take the kernel's event_mutex, held by every other
tracer's teardown across a grace period per probe), read back from the kernel's own
description of each link (/proc/PID/fdinfo)."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from test_triage import build
from tracing import attach, waiting

pytestmark = pytest.mark.bpf


def _links(pid: int) -> tuple[list[dict[str, str]], int]:
    """(the fdinfo of each BPF link process `pid` holds, its perf-event fds)."""
    links, perf = [], 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = os.readlink(f"/proc/{pid}/fd/{fd}")
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        perf += kind == "anon_inode:[perf_event]"
        if kind == "anon_inode:bpf_link":
            fields = dict(line.split(":\t", 1) for line in info.splitlines() if ":\t" in line)
            lines = info.splitlines()
            # uprobe links end in "cookie offset ref_ctr_offset" rows, one per probe
            rows = lines[lines.index("cookie\t offset\t ref_ctr_offset") + 1:] \
                if "cookie\t offset\t ref_ctr_offset" in lines else []
            fields["probes"] = ";".join(" ".join(r.split()[1:]) for r in rows)
            links.append(fields)
    return links, perf


def _symbol_offset(path: str, name: str) -> int:
    """A function's file offset in a shared library (its value less its segment's)."""
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        sym = elf.get_section_by_name(".dynsym").get_symbol_by_name(name)[0]
        value = sym["st_value"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= value < \
                    seg["p_vaddr"] + seg["p_memsz"]:
                return int(value - seg["p_vaddr"] + seg["p_offset"])
    raise AssertionError(f"{name} is in no segment of {path}")


def test_every_probe_is_a_link_and_none_a_perf_event() -> None:
    with waiting(str(build("memsys"))) as target:
        maps = Path(f"/proc/{target.pid}/maps").read_text().splitlines()
        tracer = attach(target.pid, "--duration", "10m", "--triage")
        try:
            links, perf = _links(tracer.pid)
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.communicate(timeout=120)
    raw = collections.Counter(link["tp_name"] for link in links
                              if link["link_type"] == "raw_tracepoint")
    # alloc: exec, fork, exit, syscalls; triage: exec, page faults (its syscall programs
    # are tail-called by alloc's: one program per direction on every syscall of the
    # machine); handles: exec
    assert raw == {"sched_process_exec": 3, "sched_process_fork": 1,
                   "sched_process_exit": 1, "sys_enter": 1, "sys_exit": 1,
                   "page_fault_user": 1}
    uprobes = [link for link in links
               if link["link_type"] in ("uprobe_multi", "uretprobe_multi")]
    assert len(uprobes) + sum(raw.values()) == len(links)
    assert {link["pid"] for link in uprobes} <= {str(target.pid)}
    # one probe each, and no USDT semaphore counted where there is none (bcc 0.26's
    # attach_uprobe passes whatever is on the stack as ref_ctr_offset)
    assert all(link["uprobe_cnt"] == "1" and link["probes"].endswith(" 0x0")
               for link in uprobes)
    if perf:
        # Another tool's bcc probe sits on libc's allocator (this machine is shared):
        # natrace's probe of each such instruction is a perf event beside it.
        return
    libc = next(line.split()[-1] for line in maps if line.endswith("/libc.so.6"))
    malloc = f"{_symbol_offset(libc, 'malloc'):#x} 0x0"
    at_malloc = sorted(link["link_type"] for link in uprobes
                       if link["path"] == os.path.realpath(libc) and link["probes"] == malloc)
    assert at_malloc == ["uprobe_multi", "uretprobe_multi"]
