"""Expected failures and their exit codes.

Every failure a user can cause or fix (bad PID, no root, missing kernel feature,
corrupted file) is raised as a NatraceError subclass; the CLI prints its message
on one line and exits with its code. Anything else is a bug and gets a traceback
only under --debug.
"""

from __future__ import annotations


class NatraceError(Exception):
    """A failure the user can act on: one line of text, one exit code."""

    exit_code = 1


class UsageError(NatraceError):
    """Bad option values or arguments."""

    exit_code = 2


class PrivilegeError(NatraceError):
    """Not root and lacking CAP_BPF/CAP_PERFMON."""

    exit_code = 2


class TargetError(NatraceError):
    """The target process doesn't exist, is a kernel thread, a zombie, or vanished."""

    exit_code = 3


class KernelFeatureError(NatraceError):
    """tracefs, uprobes, headers, bcc or a tracepoint is missing."""

    exit_code = 4


class OutputError(NatraceError):
    """An output path natrace may not or cannot write (found before any probe is
    attached), or a write that failed (disk full, I/O error, a FIFO's reader gone)."""

    exit_code = 5


class PipeClosed(NatraceError):
    """A FIFO or pipe natrace was writing lost its reader: 128 + SIGPIPE, as a shell
    reports a program killed by SIGPIPE (natrace's own stdout ends so quietly)."""

    exit_code = 141


class FileFormatError(NatraceError):
    """A recording or input file is missing, truncated, corrupted or too new."""

    exit_code = 2


class AttachInterrupted(NatraceError):
    """SIGINT, SIGTERM or SIGHUP while the probes were being placed: what was placed is
    removed and natrace exits 128 + the signal's number, as if killed by it."""

    def __init__(self, signame: str, signum: int) -> None:
        super().__init__(f"stopped by {signame} while attaching: nothing was traced, and "
                         "every probe placed was removed")
        self.exit_code = 128 + signum
