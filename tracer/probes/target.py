"""The traced process: attached by PID, or launched by natrace with probes in place first."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tracer.errors import TargetError, UsageError


@dataclass
class Target:
    """A process natrace traces: launched by natrace, attached by PID, or (`parent` set)
    forked by a traced process and followed."""

    pid: int
    argv: list[str] = field(default_factory=list)
    launched: bool = False
    _gate: int | None = None
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)  # what attach() resolved or noticed
    env: dict[str, str] | None = None  # a launched command's environment (None: natrace's)
    _planned: list[str] = field(default_factory=list)  # what a followed exec will load
    parent: int = 0  # the traced process that forked it (0: the one natrace was given)
    _gate_files: list[str] | None = None  # planned_libraries() while held at the gate

    def alive(self) -> bool:
        if self.launched:
            if self.exit_code is None:
                self._reap(os.WNOHANG)
            return self.exit_code is None
        return _proc_state(self.pid) not in (None, "Z", "X")

    def mapped_files(self) -> list[str]:
        """Files the target maps now (or, before exec, the files it will load)."""
        if self._gate is not None:  # the plan cannot change before the exec: asked once
            if self._gate_files is None:
                self._gate_files = planned_libraries(self.argv, self.env)
            return list(self._gate_files)
        return list(dict.fromkeys([*self._planned, *mapped_files(self.pid)]))

    def stopped_now(self) -> bool:
        """Is the process stopped (state T) now? Any process, not only natrace's child;
        never reaps."""
        return _proc_state(self.pid) in ("T", "t")

    def follow_exec(self) -> None:
        """The launched command exec'd another program (env, nice, a script's exec) and
        is stopped before its first instruction: it is that program from now on. Its
        libraries are not mapped yet: they are planned with its own environment
        (LD_PRELOAD, LD_LIBRARY_PATH)."""
        argv = command_of(self.pid)
        try:
            with open(f"/proc/{self.pid}/environ", "rb") as fh:
                env = dict(kv.decode(errors="replace").split("=", 1)
                           for kv in fh.read().split(b"\0") if b"=" in kv)
        except OSError:
            return
        exe = self.executable()
        self.argv = argv or self.argv
        self._planned = planned_libraries([exe], env) if exe else []

    def executable(self) -> str | None:
        if self._gate is not None:
            return resolve_command(self.argv[0])
        try:
            return os.readlink(f"/proc/{self.pid}/exe").removesuffix(" (deleted)")
        except OSError:
            return None

    def exit_library(self) -> str | None:
        """The file holding the _Exit the process ends in: its libc (glibc or musl), or
        the executable itself when it is static."""
        exe = self.executable()
        if exe is not None and is_static_executable(exe):
            return exe
        return next((p for p in self.mapped_files() if _LIBC_FILE.search(p)), None)

    def release(self) -> None:
        """Let a launched child exec its command (probes are in place by now)."""
        if self._gate is not None:
            os.write(self._gate, b"go")
            os.close(self._gate)
            self._gate = None

    def abandon(self) -> None:
        """A launched child whose probes never got in place: close its gate without
        the word, so it exits (127) instead of running the command untraced; reaped."""
        if self._gate is not None:
            os.close(self._gate)
            self._gate = None
            self.wait()

    def wait_stopped(self) -> bool:
        """Wait for a launched child's imminent stop; False if it exited instead."""
        return self.launched and self.exit_code is None and self._reap(os.WUNTRACED)

    def stopped(self) -> bool:
        """A launched child that has stopped (natrace's exit() probe stops it there);
        reaps it, recording its exit code, if it has exited instead."""
        return self.launched and self.exit_code is None and self._reap(
            os.WNOHANG | os.WUNTRACED)

    def _reap(self, options: int) -> bool:
        """waitpid; True when the child reported a stop rather than an exit."""
        try:
            pid, status = os.waitpid(self.pid, options)
        except ChildProcessError:
            self.exit_code = self.exit_code if self.exit_code is not None else 0
            return False
        if not pid:
            return False
        if os.WIFSTOPPED(status):
            return True
        self.exit_code = os.waitstatus_to_exitcode(status)
        if self.exit_code < 0:  # killed by a signal: the shell's convention
            self.exit_code = 128 - self.exit_code
        return False

    def children(self) -> list[int]:
        """PIDs of the target's children now (natrace does not follow forks)."""
        found: list[int] = []
        try:
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/children") as fh:
                    found += [int(p) for p in fh.read().split()]
        except (OSError, ValueError):
            pass
        return found

    def wait(self) -> int | None:
        """Wait for a launched child and return its exit code (None if attached)."""
        if self.launched and self.exit_code is None:
            self._reap(0)
        return self.exit_code

    def pass_on(self, signum: signal.Signals) -> None:
        """Send a launched command the stop signal natrace got, unless the terminal
        already sent it to the command's process group too (Ctrl-C, a hangup): a second
        SIGINT reads as "force quit" to many programs."""
        if not self.launched or not self.alive():
            return
        if signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP) and \
                _in_terminal_foreground(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        """Stop a child natrace launched (never an attached process)."""
        if not self.alive():
            return
        self.release()
        os.kill(self.pid, signal.SIGTERM)
        for _ in range(50):
            if not self.alive():
                return
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        self.wait()


def child(pid: int, parent: int) -> Target:
    """A process a traced one forked, stopped before its first instruction."""
    return Target(pid=pid, argv=command_of(pid) or [f"[{pid}]"], parent=parent)


def shares_memory(pid: int, other: int) -> bool:
    """Do two processes share one address space (a vfork child until it execs)?
    kcmp(2) with KCMP_VM; False when it cannot tell."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.syscall(_SYS_KCMP, pid, other, _KCMP_VM, 0, 0) == 0)


_SYS_KCMP = 312  # x86-64
_KCMP_VM = 1


def command_of(pid: int) -> list[str]:
    """A process's argv from /proc (empty when it is gone or has none)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _stat_state(stat: str) -> str:
    return stat.rsplit(")", 1)[1].split()[0]


def _proc_state(pid: int) -> str | None:
    """The process's state letter from /proc/PID/stat (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return _stat_state(fh.read())
    except OSError:
        return None


def attach(pid: int) -> Target:
    """Validate a PID for attaching: exists, user-space, not a zombie, not natrace itself.
    A thread id is taken as its process (said in the Target's notes)."""
    if pid <= 0:
        raise UsageError(f"invalid PID {pid}: give the PID of a running process")
    notes: list[str] = []
    tgid = _tgid(pid)
    if tgid is not None and tgid != pid:
        notes.append(f"{pid} is a thread of process {tgid}: natrace traces the whole "
                     f"process {tgid} (uprobes see every thread)")
        pid = tgid
    if pid == os.getpid():
        raise TargetError("natrace cannot trace itself: give another PID")
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except FileNotFoundError:
        raise TargetError(f"no process with PID {pid}: check the PID with ps") from None
    except PermissionError:
        raise TargetError(f"cannot read /proc/{pid}: run natrace as root") from None
    state = _stat_state(stat)
    if state in ("Z", "X"):
        raise TargetError(f"process {pid} is a zombie: it has exited and has no memory to trace")
    flags = int(stat.rsplit(")", 1)[1].split()[6])
    if flags & 0x00200000:  # PF_KTHREAD
        raise TargetError(f"process {pid} is a kernel thread: give a user-space process")
    try:
        with open(f"/proc/{pid}/maps") as fh:
            has_files = any(len(parts) == 6 and parts[5].startswith("/")
                            for parts in (line.split(maxsplit=5) for line in fh))
    except OSError as err:
        raise TargetError(f"cannot read /proc/{pid}/maps ({err.strerror}): the kernel denies "
                          "natrace access to this process's memory (it needs ptrace access: "
                          "CAP_SYS_PTRACE over the process's user namespace)") from None
    if not has_files:
        raise TargetError(f"process {pid} maps no files: there is no code natrace could "
                          "probe")
    return Target(pid=pid, argv=argv, notes=notes)


def _tgid(pid: int) -> int | None:
    """The process a thread id belongs to (/proc/TID exists though ls never shows it)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def stopped_note(pid: int) -> str | None:
    """What a report must say when the process is stopped (SIGSTOP, Ctrl-Z, a debugger):
    it allocates nothing meanwhile, so small or empty figures are no all-clear."""
    state = _proc_state(pid)
    if state not in ("T", "t"):
        return None
    return (f"process {pid} is stopped (state {state}: SIGSTOP, Ctrl-Z or a debugger): it "
            f"allocates nothing until it continues (kill -CONT {pid})")


def launch(argv: Sequence[str], env: Mapping[str, str] | None = None,
           stdout: int | None = None, stderr: int | None = None) -> Target:
    """Fork the command held at a gate: it execs only after release(), so probes
    attached in between see its first allocation. Never run through a shell. `env`
    replaces the environment; `stdout`/`stderr`: descriptors the command gets as its
    own (default: natrace's; 2 as stdout keeps natrace's stdout for its report)."""
    if not argv:
        raise UsageError("no command given: natrace run -- CMD ARGS")
    exe = resolve_command(argv[0])
    if exe is None:
        raise TargetError(f"command not found: {argv[0]}")
    if not os.path.isfile(exe) or not os.stat(exe).st_mode & 0o111:  # root passes access()
        raise TargetError(f"command is not executable: {exe}")
    with open(exe, "rb") as fh:
        if fh.read(4) not in (b"\x7fELF",) and not _interpreter_of_script(exe):
            raise TargetError(f"cannot execute {exe}: not an ELF program or a #! script")
    read_end, write_end = os.pipe()
    args = [exe, *argv[1:]]
    pid = os.fork()
    if pid == 0:  # child: wait at the gate, then become the command
        try:
            os.close(write_end)
            for fd, std in ((stdout, 1), (stderr, 2)):
                if fd is not None:
                    os.dup2(fd, std)
            if os.read(read_end, 2) != b"go":  # EOF: natrace failed or died before
                os._exit(127)                  # its probes were in place: never run untraced
            os.close(read_end)
            os.execve(exe, args, dict(os.environ if env is None else env))
        finally:
            os._exit(127)
    os.close(read_end)
    return Target(pid=pid, argv=args, launched=True, _gate=write_end,
                  env=None if env is None else dict(env))


def resolve_command(name: str) -> str | None:
    if "/" in name:
        return os.path.abspath(name) if os.path.exists(name) else None
    return shutil.which(name)


def mapped_files(pid: int) -> list[str]:
    """Distinct file paths in /proc/PID/maps (empty for kernel threads or on error)."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    paths: dict[str, None] = {}
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            paths.setdefault(parts[5].rstrip("\n").removesuffix(" (deleted)"), None)
    return list(paths)


_LIBC_FILE = re.compile(r"(^|/)(libc\.so[.\d]*|libc-[\d.]+\.so|ld-musl-[^/]*\.so[.\d]*)$")
_LDD_LINE = re.compile(r"=>\s+(/\S+)|^\s*(/\S+)\s+\(")


def planned_libraries(argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """Shared libraries a command will load, from its dynamic loader's --list mode
    (honours LD_PRELOAD and LD_LIBRARY_PATH of `env`, else natrace's). Scripts are
    followed to their interpreter."""
    exe = resolve_command(argv[0])
    if exe is None:
        return []
    exe = _interpreter_of_script(exe) or exe
    interp = elf_interpreter(exe)
    if interp is None:
        return [exe]  # static: the allocator lives in the executable
    try:
        out = subprocess.run([interp, "--list", exe], capture_output=True, text=True,
                             timeout=10, check=False, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return [exe]
    libs = [m.group(1) or m.group(2) for m in map(_LDD_LINE.search, out.splitlines()) if m]
    return [exe, *libs]


def _interpreter_of_script(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    if not words:
        return None
    interp = words[0].decode(errors="replace")
    if interp.endswith("/env") and len(words) > 1:
        return shutil.which(words[1].decode(errors="replace"))
    return interp


def is_static_executable(path: str) -> bool:
    """An ELF program with no dynamic loader: its libc and allocator are inside it."""
    return elf_interpreter(path) is None and _is_elf(path)


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_interpreter(path: str) -> str | None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as fh:
            for seg in ELFFile(fh).iter_segments():
                if seg["p_type"] == "PT_INTERP":
                    return str(seg.get_interp_name())  # type: ignore[attr-defined]
    except (OSError, ELFError):
        return None
    return None


def _in_terminal_foreground(pid: int) -> bool:
    """Is `pid` in the foreground process group of natrace's controlling terminal (the
    group a terminal's Ctrl-C and hangup go to)?"""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgid(pid)
    except OSError:
        return False
    finally:
        os.close(fd)
