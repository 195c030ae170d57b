"""What every probe set shares: its compiled BPF program, the user stacks it stores
(bpf/stacks.bpf.h), the target flags of bpf/target.bpf.h, and detaching."""

from __future__ import annotations

import ctypes
from typing import Any

from tracer import bpfprog
from tracer.probes.stacks import StackReader
from tracer.target import Target


class ProbeSet:
    def __init__(self) -> None:
        self._bpf: Any = None
        self._stacks: StackReader | None = None

    def _load(self, source: str, target: Target, defines: dict[str, int | str]) -> None:
        """Compile bpf/<source> for this target (launched: held at the exec gate)."""
        if target.launched:
            defines = {**defines, "WAIT_EXEC": 1}
        self._bpf = bpfprog.compile_program(source, {"TARGET_TGID": target.pid, **defines})
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
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
