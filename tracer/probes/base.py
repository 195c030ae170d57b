"""What every probe set shares: its compiled BPF program, the user stacks it stores
(bpf/stacks.bpf.h), the target flags of bpf/target.bpf.h, and detaching."""

from __future__ import annotations

import contextlib
import ctypes
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tracer.probes import bpfprog
from tracer.probes.stacks import StackReader
from tracer.probes.target import Target


class ProbeSet:
    def __init__(self) -> None:
        self._bpf: Any = None
        self._stacks: StackReader | None = None

    def _load(self, source: str, target: Target, defines: dict[str, int | str]) -> None:
        """Compile bpf/<source> for this target (launched: held at the exec gate)."""
        if target.launched:
            defines = {**defines, "WAIT_EXEC": 1}
        self._bpf = bpfprog.compile_program(source, defines)
        self._bpf["target"][ctypes.c_int(0)] = ctypes.c_uint32(target.pid)
        self._bpf.attach_tracepoint_functions()
        self._stacks = StackReader(self._bpf)

    def _arm(self, target: Target) -> None:
        """Call once every probe is attached. A running target records from then on (a
        thread inside malloc meanwhile entered unseen, so its return is ignored, instead
        of leaving a half-seen call that would hide the thread's later calls as nested);
        a launched one records from its gate's exec."""
        if not target.launched:
            self._bpf["armed"][ctypes.c_int(0)] = ctypes.c_uint32(1)

    def stack(self, stack_id: int) -> tuple[int, ...]:
        return self._stacks(stack_id) if self._stacks else ()

    def execs(self) -> int:
        """exec()s of the target since the probes were attached."""
        if self._bpf is None:
            return 0
        return int(self._bpf["execs"][ctypes.c_int(0)].value)

    def detach(self) -> None:
        """Remove every probe. Each removal waits for the kernel's grace period
        (~0.06-0.1 s): one by one, as bcc's cleanup() does, 60 probes took 5 s, so
        they are closed concurrently first; cleanup() then frees the rest."""
        if self._bpf is None:
            return
        bpf, self._bpf = self._bpf, None
        jobs = [(bpf.detach_uprobe_event, ev) for ev in list(bpf.uprobe_fds)]
        jobs += [(bpf.detach_tracepoint, tp) for tp in list(bpf.tracepoint_fds)]
        if jobs:
            with ThreadPoolExecutor(max_workers=min(len(jobs), 64)) as pool:
                for future in [pool.submit(fn, name) for fn, name in jobs]:
                    with contextlib.suppress(Exception):  # cleanup() retries what failed
                        future.result()
        bpf.cleanup()
