"""A symbolized stack frame and the module it belongs to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Frame:
    """One return address, named as well as the symbolizer could.

    `module` is the mapped file's path ("" when the address is in no known mapping);
    `module_class` is its attribution class (libpq, addon:<name>, node, js, libc, ...).
    """

    address: int
    module: str = ""
    module_offset: int = 0
    symbol: str | None = None
    symbol_offset: int = 0
    file: str | None = None
    line: int | None = None
    module_class: str = "unknown"

    @property
    def module_name(self) -> str:
        return self.module.rsplit("/", 1)[-1] if self.module else "[unknown]"

    def label(self) -> str:
        """`symbol+0xoff`, else `module+0xoff`: never a bare [unknown] in a known module."""
        if self.symbol:
            text = self.symbol
            if self.symbol_offset:
                text += f"+{self.symbol_offset:#x}"
        elif self.module:
            text = f"{self.module_name}+{self.module_offset:#x}"
        else:
            text = f"[unknown {self.address:#x}]"
        if self.file and self.line:
            text += f" ({self.file.rsplit('/', 1)[-1]}:{self.line})"
        return text


def charged(frames: list[Frame], charge_index: int) -> Frame | None:
    """The frame figures are charged to (None for a stack that was not captured)."""
    return frames[min(charge_index, len(frames) - 1)] if frames else None


def function_key(frame: Frame | None, lost_stack: str | None = None) -> tuple[str, str]:
    """The function a call site is grouped by across stacks and snapshots: (module,
    symbol), else (module, offset), else the bare address; ("", "lost:WHY") for a
    stack that was not captured."""
    if frame is None:
        return ("", f"lost:{lost_stack}")
    if frame.symbol:
        return (frame.module, frame.symbol)
    if frame.module:
        return (frame.module, f"{frame.module_offset:#x}")
    return ("", f"{frame.address:#x}")
