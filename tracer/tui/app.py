"""The full-screen `natrace top` (Textual).

A thread runs the LiveDriver (the only code that touches the session and bcc) and posts
each LiveState to the app as a message; the app only formats what views.py builds.
Paused, the app keeps receiving states but shows none until resumed.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable

from rich.console import Console
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.driver import Driver
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Static

from tracer.engine.live import LiveDriver, LiveState
from tracer.tui.terminal import TerminalDriver
from tracer.tui.views import (
    SUSPECT,
    VIEWS,
    Row,
    Table,
    filtered_rows,
    header_lines,
    sorted_rows,
)

# Writes the current state as "report" or "flamegraph"; returns what to tell the user.
Writer = Callable[[LiveState, str], str]


class StateReady(Message):
    def __init__(self, state: LiveState) -> None:
        super().__init__()
        self.state = state


class StackScreen(ModalScreen[None]):
    """One call site's full stack; Escape or Enter closes it."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, title: str, lines: list[str]) -> None:
        super().__init__()
        self.title_text = title
        self.lines = lines

    def compose(self) -> ComposeResult:
        with Vertical(id="stack"):
            yield Static(self.title_text, id="stack-title", markup=False)
            with VerticalScroll():
                yield Static("\n".join(self.lines), id="stack-frames", markup=False)
        yield Footer()


class FilterScreen(ModalScreen[str]):
    """Asks for filter text: a substring of any cell, or `module:NAME`; empty clears."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="filter"):
            yield Static("Filter rows (text, or module:NAME; empty clears):")
            yield Input(value=self.current, id="filter-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(self.current)


class TopApp(App[None]):
    CSS = """
    #header { height: 4; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    #status { height: 1; padding: 0 1; text-style: bold; }
    #message { height: auto; padding: 0 1; display: none; }
    DataTable { height: 1fr; }
    #stack, #filter { width: 90%; height: auto; max-height: 90%; border: solid $accent;
                      background: $surface; padding: 0 1; }
    #stack VerticalScroll { height: auto; max-height: 18; }
    StackScreen, FilterScreen { align: center middle; }
    """
    BINDINGS = [
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("q", "quit", "Quit"),
        Binding("v", "next_view", "View"),
        *(Binding(key, f"view('{name}')", name.capitalize(), show=False)
          for name, (key, _) in VIEWS.items()),
        Binding("s", "sort", "Sort"),
        Binding("p,space", "pause", "Pause"),
        Binding("slash", "filter", "Filter"),
        Binding("enter", "stack", "Stack"),
        Binding("w", "write('report')", "Report"),
        Binding("f", "write('flamegraph')", "Flame"),
    ]

    def __init__(self, driver: LiveDriver | None, writer: Writer, view: str = "sites",
                 driver_class: type[Driver] | None = None) -> None:
        super().__init__(driver_class=driver_class)
        self.driver = driver
        self.writer = writer
        self.state: LiveState | None = None  # what is on screen
        self.latest: LiveState | None = None  # newest received (differs while paused)
        self.paused = False
        self.view = view
        self.sort_column: int | None = None  # None: the view's own ranking
        self.filter_text = ""
        self.shown: list[Row] = []  # the rows on screen, in order
        self._thread: threading.Thread | None = None
        self.crash: Exception | None = None  # what ended the app, if a bug did
        # Textual prints a crash's traceback (with locals) once the screen is restored:
        # natrace says it in one line instead (run_tui), --debug shows the traceback
        self.error_console = Console(file=io.StringIO())

    def _handle_exception(self, error: Exception) -> None:
        if self.crash is None:
            self.crash = error
        super()._handle_exception(error)

    def compose(self) -> ComposeResult:
        # markup off: a command line, function or filter holding `[/x]` is text
        yield Static("natrace top: waiting for the first interval…", id="header",
                     markup=False)
        yield Static("", id="status", markup=False)
        yield Static("", id="message", markup=False)
        yield DataTable(cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.title = "natrace top"
        if self.driver is not None:
            self._thread = threading.Thread(target=self._drive, name="natrace-live",
                                            daemon=True)
            self._thread.start()

    def _drive(self) -> None:
        """The driver thread: poll, sample, post; ends when the driver stops. A stop
        signal (the terminal closed, SIGTERM) ends the app too: a top nobody can see or
        quit must not keep the probes in place. So does a failure while polling or
        sampling, taken as the app's crash: a frozen view that `q` leaves with 0 would
        hide it."""
        assert self.driver is not None
        try:
            while (state := self.driver.next_state()) is not None:
                try:
                    self.post_message(StateReady(state))
                except RuntimeError:  # the app's loop is gone
                    return
        except Exception as error:  # run_tui returns it, top reports it in one line
            if self.crash is None:
                self.crash = error
            with contextlib.suppress(RuntimeError):  # the app's loop may be gone
                self.call_from_thread(self.exit)
            return
        if self.driver.session.stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the app's loop may be gone
                self.call_from_thread(self.exit)

    def stop_driver(self, timeout: float = 10.0) -> None:
        """Stop the driver and wait for its thread, so no snapshot runs after this."""
        if self.driver is not None:
            self.driver.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def on_state_ready(self, message: StateReady) -> None:
        self.latest = message.state
        if not self.paused or self.state is None:
            self.show(message.state)

    def show(self, state: LiveState) -> None:
        self.state = state
        self.query_one("#header", Static).update("\n".join(header_lines(state, self.paused)))
        self._fill()

    def _table(self) -> Table | None:
        return VIEWS[self.view][1](self.state) if self.state is not None else None

    def _fill(self, reset_columns: bool = False) -> None:
        table = self._table()
        if table is None:
            return
        data = self.query_one(DataTable)
        selected = self._selected_key()
        data.clear(columns=reset_columns or len(data.columns) != len(table.columns))
        if not data.columns:
            for i, col in enumerate(table.columns):
                data.add_column(Text(col.title, justify="right" if col.numeric else "left"),
                                width=col.width or None, key=str(i))
        descending = self.sort_column is not None and \
            table.columns[self.sort_column].numeric
        rows = sorted_rows(filtered_rows(table.rows, self.filter_text), self.sort_column,
                           descending)
        for row in rows:
            data.add_row(*self._cells(table, row), key=row.key)
        self.shown = rows
        if selected is not None and any(r.key == selected for r in rows):
            data.move_cursor(row=data.get_row_index(selected))
        message = self.query_one("#message", Static)
        message.display = not rows
        data.display = bool(rows)
        if not rows:
            message.update(table.empty if not table.rows else
                           f"no rows match the filter {self.filter_text!r}")
        self._status(table, len(rows))

    @staticmethod
    def _cells(table: Table, row: Row) -> list[Text]:
        cells = []
        for col, cell in zip(table.columns, row.cells):
            style = "bold reverse" if cell == SUSPECT else ""
            cells.append(Text(cell, style=style, justify="right" if col.numeric else "left"))
        return cells

    def _status(self, table: Table, count: int) -> None:
        parts = [table.title, f"{count} rows"]
        if self.sort_column is not None:
            parts.append(f"sorted by {table.columns[self.sort_column].title or 'rank'}")
        if self.filter_text:
            parts.append(f"filter {self.filter_text}")
        if self.paused:
            parts.append("PAUSED")
        self.query_one("#status", Static).update(" · ".join(parts))

    def _selected_key(self) -> str | None:
        data = self.query_one(DataTable)
        if not self.shown or data.cursor_row < 0 or data.cursor_row >= len(self.shown):
            return None
        return self.shown[data.cursor_row].key

    def selected_row(self) -> Row | None:
        key = self._selected_key()
        return next((r for r in self.shown if r.key == key), None)

    def action_view(self, name: str) -> None:
        self.view = name
        self.sort_column = None
        self._fill(reset_columns=True)

    def action_next_view(self) -> None:
        names = list(VIEWS)
        self.action_view(names[(names.index(self.view) + 1) % len(names)])

    def action_sort(self) -> None:
        """Next column (descending for numbers); after the last, back to the ranking."""
        table = self._table()
        if table is None:
            return
        nxt = 0 if self.sort_column is None else self.sort_column + 1
        self.sort_column = nxt if nxt < len(table.columns) else None
        self._fill()

    def action_pause(self) -> None:
        self.paused = not self.paused
        if self.latest is not None:
            self.show(self.latest)  # resumed: jump to now; paused: mark it

    def action_filter(self) -> None:
        def apply(text: str | None) -> None:
            self.filter_text = text or ""
            self._fill()
        self.push_screen(FilterScreen(self.filter_text), apply)

    def on_data_table_row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_stack()

    def action_stack(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        if row.stack:
            summary = "  ".join(c.strip() for c in row.cells if c.strip())
            self.push_screen(StackScreen(summary, row.stack))
        elif self.view == "modules":  # a module row narrows the call sites to it
            self.filter_text = f"module:{row.module}"
            self.action_view("sites")

    def action_write(self, what: str) -> None:
        if self.state is None:
            return
        self.notify(self.writer(self.state, what), timeout=6, markup=False)

    async def action_quit(self) -> None:
        if self.driver is not None:
            self.driver.stop()
        self.exit()


def run_tui(driver: LiveDriver, writer: Writer,
            view: str = "sites") -> tuple[LiveState | None, Exception | None]:
    """Run the app until quit or Ctrl-C; the driver is stopped before returning. The
    state last on screen, for the --record/--flamegraph files saved at the end, and
    the exception that ended the app if it crashed (raised once those are saved)."""
    app = TopApp(driver, writer, view, TerminalDriver)
    try:
        app.run()
    finally:
        app.stop_driver()
    return app.state, app.crash


def report_name(pid: int, suffix: str) -> str:
    return f"natrace-top-{pid}-{time.strftime('%Y%m%d-%H%M%S')}.{suffix}"
