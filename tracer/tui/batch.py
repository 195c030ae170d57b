"""`natrace top` when stdout is not a terminal: a plain frame every interval, like `top -b`."""

from __future__ import annotations

import time

from tracer.engine.live import LiveState
from tracer.tui.views import VIEWS, Table, header_lines


def table_text(table: Table, width: int, limit: int | None = None) -> list[str]:
    """The table as aligned plain text lines fitting `width` characters."""
    fixed = sum(c.width + 1 for c in table.columns if c.width)
    rest = max(width - fixed, 10)
    widths = [c.width or rest for c in table.columns]

    def line(cells: tuple[str, ...]) -> str:
        parts = [(cell.rjust(w) if col.numeric else cell.ljust(w))[:w]
                 for cell, col, w in zip(cells, table.columns, widths)]
        return " ".join(parts).rstrip()

    rows = table.rows[:limit] if limit is not None else table.rows
    if not rows:
        return [f"{table.title}: {table.empty}"]
    return [line(tuple(c.title for c in table.columns)), *(line(r.cells) for r in rows)]


def batch_text(state: LiveState, view: str, width: int, limit: int) -> str:
    """One `top -b` style frame: a timestamped header, then the view's table."""
    when = time.strftime("%H:%M:%S", time.localtime(state.snapshot.taken_at))
    table = VIEWS[view][1](state)
    lines = [f"natrace top - {when}", *header_lines(state), "", *table_text(table, width, limit)]
    return "\n".join(lines) + "\n\n"
