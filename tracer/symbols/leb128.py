"""DWARF's variable-length integers (LEB128), for the decoders natrace keeps itself
(call frames in cfi.py, line programs in elfsyms.py). A truncated number raises
IndexError, which each decoder turns into "no information"."""

from __future__ import annotations


def uleb(data: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 at `pos` and the position after it."""
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def sleb(data: bytes, pos: int) -> tuple[int, int]:
    """The signed LEB128 at `pos` and the position after it."""
    result = shift = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            if b & 0x40:
                result -= 1 << shift
            return result, pos
