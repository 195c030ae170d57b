"""bcc's memleak-bpfcc as the benchmark runs it: the same script, with bcc 0.26's
Python binding of bpf_attach_uprobe given the seventh argument libbcc takes.

    python -m bench.memleak MEMLEAK-ARGS...

Debian's bcc 0.26 declares six arguments for libbcc's seven (the last,
ref_ctr_offset, is whatever the stack holds: 0x6 here). The kernel refuses a probe
on an instruction that another registered probe counts with another semaphore, so
the stock script fails with "cannot attach uprobe, Invalid argument" while any
other tracer (natrace, a second memleak) has a probe on malloc anywhere on the
machine. natrace's own attach passes the argument (tracer/probes/bpfimage.py).
"""

from __future__ import annotations

import ctypes as ct
import runpy
import sys
from typing import Any

from bcc import libbcc

SCRIPT = "/usr/sbin/memleak-bpfcc"


def _fix_attach_uprobe() -> None:
    attach = libbcc.lib.bpf_attach_uprobe
    attach.argtypes = [ct.c_int, ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_ulonglong,
                       ct.c_int, ct.c_uint32]

    def with_no_semaphore(*args: Any) -> Any:
        return attach(*args, 0) if len(args) == 6 else attach(*args)

    libbcc.lib.bpf_attach_uprobe = with_no_semaphore


if __name__ == "__main__":
    _fix_attach_uprobe()
    sys.argv = [SCRIPT, *sys.argv[1:]]
    runpy.run_path(SCRIPT, run_name="__main__")
