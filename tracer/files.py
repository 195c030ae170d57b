"""Where natrace's outputs go, and writing them without harming anything else.

natrace runs as root, so an output path is checked before any probe is attached and
written by these rules: an absent path or a regular file is replaced atomically (a
temporary file in the same directory, mode 0600 because reports name code paths,
renamed into place, so a reader never sees half a report); a symlink is followed and
its target treated by the same rules; a character device or FIFO is opened and
written in place, like a shell's `>`; /dev/stdout, /dev/stderr and /dev/fd/N write to
natrace's own descriptor. Nothing that is not a regular file is ever replaced,
removed or chmod'ed. Writes to a descriptor survive O_NONBLOCK (node sets it on the
stdout it shares): EAGAIN waits for the descriptor to drain.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from tracer.errors import OutputError, PipeClosed, UsageError

_FD_PATH = re.compile(r"/(?:dev/fd|proc/self/fd|proc/thread-self/fd|proc/(\d+)/fd)/(\d+)")
_SYMLINK_HOPS = 40  # the kernel's own limit


@dataclass(frozen=True)
class Output:
    """An output path resolved: `kind` is "file" (absent or regular: replaced
    atomically at `real`), "device" (character device or FIFO: written in place at
    `real`) or "fd" (one of natrace's own descriptors, `fd`)."""

    path: str
    option: str
    kind: str
    real: str
    fd: int = -1
    what: str = "a file"

    def fail(self, why: str) -> OutputError:
        return OutputError(f"{self.option} {self.path}: {why}")


def resolve(path: str, option: str) -> Output:
    """Follow `path`'s symlinks to what would be written; refuse what never may be."""
    fd = _own_fd(path)
    if fd is not None:
        return Output(path, option, "fd", path, fd, f"descriptor {fd}")
    real = os.path.realpath(path)
    out = Output(path, option, "file", real)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return out
    except OSError as err:
        raise out.fail(err.strerror or str(err)) from None
    if stat.S_ISREG(st.st_mode):
        return out
    if stat.S_ISCHR(st.st_mode):
        return Output(path, option, "device", real, what="a character device")
    if stat.S_ISFIFO(st.st_mode):
        return Output(path, option, "device", real, what="a FIFO")
    what = ("a directory" if stat.S_ISDIR(st.st_mode) else
            "a block device" if stat.S_ISBLK(st.st_mode) else
            "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise out.fail(f"is {what}: give a file name (natrace writes regular files, "
                   "character devices and FIFOs only)")


def check_output(path: str, option: str, inputs: Sequence[str] = (),
                 regular_only: bool = False) -> Output:
    """Everything that can be known about writing `path` before tracing starts: its
    directory exists and takes new files, it is no input, and (`regular_only`, for
    SQLite recordings) it is an absent or regular file."""
    out = resolve(path, option)
    for source in inputs:
        with contextlib.suppress(OSError):
            if os.path.samefile(out.real, source):
                raise UsageError(f"{option} {path} is an input file: choose another output")
    if regular_only and out.kind != "file":
        raise out.fail(f"is {out.what}: a recording is an SQLite database and needs a "
                       "regular file")
    if out.kind == "fd":
        try:
            flags = fcntl.fcntl(out.fd, fcntl.F_GETFL)
        except OSError:
            raise out.fail(f"descriptor {out.fd} is not open") from None
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise out.fail(f"descriptor {out.fd} is open for reading only")
    elif out.kind == "device":
        if not os.access(out.real, os.W_OK):
            raise out.fail("is not writable")
    else:
        check_directory(os.path.dirname(out.real), option, out.path)
    return out


def check_directory(directory: str, option: str, path: str | None = None) -> None:
    """The directory exists and a new file can be made in it (root passes access(),
    a read-only or full file system does not: so a file is really created)."""
    name = path if path is not None else directory
    if not os.path.isdir(directory):
        why = "does not exist" if not os.path.lexists(directory) else "is not a directory"
        raise OutputError(f"{option} {name}: directory {directory} {why}")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".natrace-check-")
    except OSError as err:
        raise OutputError(f"{option} {name}: cannot create files in {directory}: "
                          f"{err.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def write_private(path: str, data: str | bytes, option: str = "output") -> None:
    """Write `path` by the rules above (a new or regular file atomically, mode 0600)."""
    out = resolve(path, option)
    raw = data.encode() if isinstance(data, str) else data
    try:
        if out.kind == "fd":
            write_fd(out.fd, raw)
        elif out.kind == "device":
            fd = _open_device(out)
            try:
                write_fd(fd, raw)
            finally:
                os.close(fd)
        else:
            replace_atomically(out.real, lambda fd, _tmp: write_fd(fd, raw))
    except BrokenPipeError:
        if out.kind == "fd" and out.fd == 1:
            raise  # stdout's reader gone: the CLI ends quietly with 141
        raise PipeClosed(f"{option} {path}: its reader closed it before everything was "
                         "written") from None
    except OSError as err:
        raise out.fail(f"cannot write: {err.strerror or err}") from None


def _open_device(out: Output) -> int:
    """A device or FIFO opened for writing, as a shell's `>` would: a FIFO nobody reads
    yet waits for its reader, and natrace says so rather than hang in silence."""
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(out.real, flags | os.O_NONBLOCK)
    except OSError as err:
        if err.errno != errno.ENXIO:  # ENXIO: a FIFO with no reader
            raise
        with contextlib.suppress(OSError):
            write_fd(2, f"natrace: {out.option} {out.path}: waiting for a reader of the "
                        "FIFO (Ctrl-C gives up)\n".encode(errors="replace"))
        return os.open(out.real, flags)
    os.set_blocking(fd, True)
    return fd


def open_stream(path: str, option: str) -> int:
    """A descriptor another process writes as it goes (a launched command's output):
    a regular file is created (0600) or truncated in place, a device or FIFO opened,
    /dev/fd/N duplicated. Never replaced, removed or chmod'ed."""
    out = check_output(path, option)
    try:
        if out.kind == "fd":
            return os.dup(out.fd)
        flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC
        return os.open(out.real, flags | (os.O_CREAT | os.O_TRUNC if out.kind == "file"
                                          else 0), 0o600)
    except OSError as err:
        raise out.fail(f"cannot open: {err.strerror}") from None


def is_stdout(path: str) -> bool:
    """Does writing `path` write natrace's own stdout (/dev/stdout, or the very file
    or pipe stdout is)?"""
    out = resolve(path, "-o")
    if out.kind == "fd":
        return out.fd == 1 or _same_file(os.fstat(out.fd), 1)
    try:
        return _same_file(os.stat(out.real), 1)
    except OSError:
        return False


def _same_file(st: os.stat_result, fd: int) -> bool:
    try:
        other = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def replace_atomically(path: str, fill: Callable[[int, str], None]) -> None:
    """A new file next to `path` (mode 0600), filled by `fill(fd, temporary path)`,
    then renamed onto `path`: the regular file there, if any, is replaced whole."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".natrace-")
    try:
        try:
            fill(fd, tmp)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_fd(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, waiting out EAGAIN on a non-blocking descriptor."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()


def write_stdout(text: str) -> None:
    """A report to stdout. EPIPE (a reader such as `head` gone) is left to the CLI,
    which ends quietly with 141; any other failure is an OutputError."""
    encoding = "utf-8"
    if sys.stdout is not None:
        sys.stdout.flush()
        encoding = sys.stdout.encoding or encoding
    stdout_bytes(text.encode(encoding, errors="replace"))


STDOUT_UNUSABLE = "stdout is closed or open for reading only: redirect it (> FILE)"


def stdout_bytes(data: bytes) -> None:
    """`data` to natrace's stdout, failing as write_stdout says (the CLI's sys.stdout
    writes through here, so click's output, --version and --help fail the same way)."""
    try:
        write_fd(1, data)
    except BrokenPipeError:
        raise
    except OSError as err:
        if err.errno == errno.EPIPE:
            raise BrokenPipeError(err.errno, err.strerror) from None
        if err.errno == errno.EBADF:
            raise OutputError(STDOUT_UNUSABLE) from None
        raise OutputError(f"cannot write to stdout: {err.strerror}") from None


def check_stdout(instead: str) -> None:
    """Before tracing, for a report that will go to stdout: refuse a stdout that cannot
    take it (`>&-`) rather than lose the report at the end; `instead` says what to do."""
    try:
        unusable = fcntl.fcntl(1, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    except OSError:
        unusable = True
    if unusable:
        raise OutputError(f"{STDOUT_UNUSABLE} {instead}")


def hold_standard_fds() -> None:
    """Put /dev/null on whichever of descriptors 0-2 natrace was started without
    (`>&-`), so no file natrace opens lands there and gets stdout's or stderr's writes;
    read-only on stdout, so a write there still fails (EBADF) and says so."""
    for fd, mode in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            os.open(os.devnull, mode)  # the lowest free descriptor: `fd` (0..fd-1 are open)


def _own_fd(path: str) -> int | None:
    """natrace's descriptor N when `path` (after symlinks) is /dev/fd/N or
    /proc/self/fd/N (/dev/stdout and /dev/stderr are symlinks to those)."""
    for _ in range(_SYMLINK_HOPS):
        path = os.path.normpath(os.path.join(os.getcwd(), path))
        m = _FD_PATH.fullmatch(path)
        if m:
            if m.group(1) is not None and int(m.group(1)) != os.getpid():
                return None
            return int(m.group(2))
        try:
            link = os.readlink(path)
        except OSError:
            return None
        path = os.path.join(os.path.dirname(path), link)
    return None


def prepare_dir(path: str, option: str) -> None:
    """An output directory, made (0700) when only its last part is missing (a typo must
    not grow a tree of directories as root), and checked to take new files."""
    if not os.path.isdir(path) and not os.path.lexists(path):
        check_directory(os.path.dirname(os.path.abspath(path)), option, path)
        try:
            os.mkdir(path, mode=0o700)
        except OSError as err:
            raise OutputError(f"{option} {path}: cannot create it: {err.strerror}") from None
    check_directory(path, option)


def open_trusted(path: str, mode: str = "r") -> IO[Any] | None:
    """A cache entry at `path` opened for reading when this user owns it and its
    directory and nobody else can write either (natrace runs as root and acts on what
    its caches say); None otherwise, or when it is missing. Not a symlink, and only a
    regular file: opened non-blocking, since a FIFO put there would hold natrace in
    open() until someone wrote to it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    fh = os.fdopen(fd, mode)
    try:
        for st in (os.fstat(fh.fileno()), os.stat(os.path.dirname(path) or ".")):
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                fh.close()
                return None
    except OSError:
        fh.close()
        return None
    return fh
