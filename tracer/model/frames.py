"""A symbolized stack frame and the module it belongs to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Frame:
    """One return address, named as well as the symbolizer could.

    `module` is the mapped file's path ("" when the address is in no known mapping);
    `module_class` is its attribution class (libpq, addon:<name>, node, js, libc, ...).
    `inlined`: a function the compiler inlined into the next frame out, which has the
    same address (DWARF's inlined_subroutine); its file:line is where it is, the next
    frame's is where that one called it.
    """

    address: int
    module: str = ""
    module_offset: int = 0
    symbol: str | None = None
    symbol_offset: int = 0
    file: str | None = None
    line: int | None = None
    module_class: str = "unknown"
    inlined: bool = False

    @property
    def module_name(self) -> str:
        return self.module.rsplit("/", 1)[-1] if self.module else "[unknown]"

    def label(self, short: bool = False) -> str:
        """`symbol+0xoff`, else `module+0xoff`: never a bare [unknown] in a known module.
        `short`: C++/Rust names shortened for tables (see `shorten`)."""
        if self.symbol:
            text = shorten(self.symbol) if short else self.symbol
            if self.symbol_offset:
                text += f"+{self.symbol_offset:#x}"
        elif self.module:
            text = f"{self.module_name}+{self.module_offset:#x}"
        else:
            text = f"[unknown {self.address:#x}]"
        where = f"{self.file.rsplit('/', 1)[-1]}:{self.line}" if self.file and self.line \
            else ""
        if self.inlined:
            where = f"{where}, inlined" if where else "inlined"
        return f"{text} ({where})" if where else text


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


_OPERATOR = re.compile(r"operator\s*(<=>|<<=|>>=|<<|>>|<=|>=|->\*|->|<|>|\(\)|\[\]|"
                       r"new\[\]|delete\[\]|new|delete|\S[^\s(]*)")


@lru_cache(maxsize=1 << 14)
def shorten(symbol: str) -> str:
    """A demangled name as a table can hold it: template arguments collapsed to `<…>`,
    the parameter list and what follows it cut, a leading return type dropped, the
    symbol version dropped: `std::vector<int, std::allocator<int> >::_M_realloc_insert<
    int const&>(iterator, int const&)` -> `std::vector<…>::_M_realloc_insert<…>`.
    Qualifying angle brackets that open a name stay (Rust's `<T as Trait>::f`, `<t::
    Cache<…>>::put`), as do `(anonymous namespace)` and operators (`operator<<`); a
    Rust turbofish `::<…>` is collapsed too."""
    name = symbol.split("@", 1)[0]
    out: list[str] = []
    i, n = 0, len(name)
    angle = 0  # open angle brackets kept in the output
    while i < n:
        ch = name[i]
        m = _OPERATOR.match(name, i) if ch == "o" and (i == 0 or not _ident(name[i - 1])) \
            else None
        if m:
            out.append(m.group(0))
            i = m.end()
        elif ch == "<" and out and (_ident(out[-1][-1]) or "".join(out).endswith("::")):
            i = _matching(name, i, "<", ">")
            out.append("<…>")
        elif ch == "<":
            angle += 1
            out.append(ch)
            i += 1
        elif ch == ">" and angle:
            angle -= 1
            out.append(ch)
            i += 1
        elif ch == "(" and name.startswith("(anonymous namespace)", i):
            out.append("(anonymous namespace)")
            i += len("(anonymous namespace)")
        elif ch == "(" and not angle:
            break  # the parameter list: the rest is parameters and qualifiers
        else:
            out.append(ch)
            i += 1
    text = "".join(out).strip()
    cut = _return_type_end(text)
    return text[cut:] if cut else text


def _ident(ch: str) -> bool:
    return ch.isalnum() or ch in "_$]"


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at `start` (the end if unbalanced)."""
    depth = 0
    for k in range(start, len(text)):
        if text[k] == open_:
            depth += 1
        elif text[k] == close:
            depth -= 1
            if depth == 0:
                return k + 1
    return len(text)


def _return_type_end(text: str) -> int:
    """Where the function name starts after a return type (`int ns::f<…>` -> 4): the
    last space outside brackets that is not inside `operator new` or `(anonymous
    namespace)`; 0 when there is none."""
    depth, cut = 0, 0
    for k, ch in enumerate(text):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == " " and depth == 0 and not text[:k].endswith("operator"):
            cut = k + 1
    return cut
