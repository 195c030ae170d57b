"""Writing natrace's outputs: atomically (a temporary file renamed into place, so a
reader never sees half a report) and private (mode 0600: reports name code paths)."""

from __future__ import annotations

import contextlib
import os
import tempfile

from tracer.errors import UsageError


def write_private(path: str, text: str | bytes) -> None:
    """Write atomically (temporary file, then rename) with mode 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".natrace-")
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"cannot write {path}: {err.strerror}") from None


def prepare_dir(path: str, option: str) -> None:
    """Create the output directory (0700) or say in one line why it is unusable."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option}: cannot create {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: {path} is not writable")
