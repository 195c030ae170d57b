"""Textual's Linux driver for a terminal that may go away under top (a closed window,
a dropped ssh session).

On a hang-up every later write to the terminal fails with EIO, and SIGHUP comes (with
SIGCONT) only if natrace leads the terminal's session or once the shell that does has
gone. Textual's own driver took neither well: its writer thread died on the failed
write, and the main thread then blocked forever putting redraws (or, after SIGHUP, the
screen-restoring escapes) into the dead thread's full queue; SIGCONT made it re-enter
full-screen mode on the dead terminal. natrace top kept its probes in the target,
unseen, and never saved its --record file. This driver drops output once the terminal
is gone and takes the first failed write as the hang-up (SIGHUP to natrace itself, so
the session's own handling runs: stop, files saved, probes detached), and does not
resume after it.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import IO, Any

from textual.drivers.linux_driver import LinuxDriver


class TerminalOutput:
    """The terminal as Textual's writer thread sees it: the first write or flush that
    fails (EIO once the terminal hung up) marks it gone and sends natrace the SIGHUP
    the kernel may never send; from then on output is dropped."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except OSError:
                self._hung_up()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except OSError:
                self._hung_up()

    def _hung_up(self) -> None:
        self.gone = True
        os.kill(os.getpid(), signal.SIGHUP)

    def fileno(self) -> int:
        return self._stream.fileno()


class TerminalDriver(LinuxDriver):
    """LinuxDriver over a TerminalOutput, which a SIGHUP marks gone before the handler
    natrace had in place (the session's stop) runs."""

    def __init__(self, app: Any, *, debug: bool = False, mouse: bool = True,
                 size: tuple[int, int] | None = None) -> None:
        super().__init__(app, debug=debug, mouse=mouse, size=size)
        assert self._file is not None  # sys.__stderr__: natrace starts with fds 0-2 open
        self.output = TerminalOutput(self._file)
        self._file = self.output  # type: ignore[assignment]  # what WriterThread writes to
        self._on_hangup = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        self.output.gone = True
        if callable(self._on_hangup):
            self._on_hangup(signum, frame)

    def _sigcont_application(self, *args: Any) -> None:
        if not self.output.gone:  # the SIGCONT of a hang-up: nothing to resume onto
            super()._sigcont_application(*args)
