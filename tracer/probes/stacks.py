"""Reading user stacks stored by bpf/stacks.bpf.h (id -> frames, zero-padded)."""

from __future__ import annotations

import ctypes
from typing import Any


class StackReader:
    """Frames of a stack id, read once and cached: ids never change meaning."""

    def __init__(self, bpf: Any) -> None:
        self._table = bpf["stack_traces"]
        self._cache: dict[int, tuple[int, ...]] = {}

    def __call__(self, stack_id: int) -> tuple[int, ...]:
        if stack_id < 0:
            return ()
        frames = self._cache.get(stack_id)
        if frames is None:
            try:
                ips = self._table[ctypes.c_int(stack_id)].ips
            except KeyError:
                return ()  # not stored (yet): don't cache the miss
            frames = tuple(ip for ip in ips if ip)
            self._cache[stack_id] = frames
        return frames
