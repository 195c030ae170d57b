"""A call site named by a symbolized stack: where a lock wait, syscall or fault came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from tracer.model.frames import Frame, charged, function_key


@dataclass
class CallSite:
    """`frames` innermost first; `charge_index` is the frame the figures belong to (the
    first outside libc/libstdc++). A stack that could not be captured has no frames and
    says why in `lost_stack`."""

    frames: list[Frame] = field(default_factory=list)
    charge_index: int = 0
    lost_stack: str | None = None
    callee: str | None = None  # the function the charged frame's call instruction called

    @property
    def frame(self) -> Frame | None:
        return charged(self.frames, self.charge_index)

    @property
    def function(self) -> str | None:
        frame = self.frame
        return frame.symbol if frame else None

    @property
    def key(self) -> tuple[str, str]:
        """The function the call site is grouped by (see frames.function_key)."""
        return function_key(self.frame, self.lost_stack or "empty stack")

    @property
    def via(self) -> str | None:
        """The outermost libc/libstdc++ function the call site went through (e.g.
        pthread_mutex_lock), None when it called the kernel directly. `callee`, when
        known, names it even where that frame has no symbol or was tail-called away."""
        if self.callee:
            return self.callee
        if self.charge_index <= 0 or not self.frames:
            return None
        symbol = self.frames[min(self.charge_index, len(self.frames)) - 1].symbol
        return symbol.split("@", 1)[0] if symbol else None  # no symbol version

    def label(self) -> str:
        frame = self.frame
        if frame is None:
            return f"[stack not captured: {self.lost_stack or 'empty stack'}]"
        return frame.label()
