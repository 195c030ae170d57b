"""What every probe set shares: its compiled BPF program, the user stacks it stores
(bpf/stacks.bpf.h), the target flags of bpf/target.bpf.h, and detaching."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from tracer.errors import AttachInterrupted, KernelFeatureError, TargetError
from tracer.probes import bpfprog, kernelbtf
from tracer.probes.stacks import StackReader
from tracer.probes.target import Target
from tracer.probes.unwinding import UnwindTables
from tracer.symbols.procmaps import MapsHistory


def exited_while_attaching(target: Target) -> TargetError:
    """The error for a target that died while its probes were being planned or placed:
    whatever else went wrong then (no maps left to read, no allocator seen) follows
    from that."""
    return TargetError(f"process {target.pid} exited while natrace attached")


#: Each unit's raw_syscalls programs, in the order of bpf/alloc.bpf.c's sys_next slots.
SYSCALL_PROGRAMS = (b"raw_tracepoint__sys_enter", b"raw_tracepoint__sys_exit")


class ProbeSet:
    #: Frames the CFI walk takes. Each costs the verifier ~2k instructions per program
    #: that walks (~0.02 s to load): allocation stacks get the most, for flamegraphs.
    unwind_depth = 127
    #: Frames per run of the walk program (bpf/stacks.bpf.h's STACK_CHUNK, and
    #: STACK_CHUNK_TP for the tracepoint walk): the verifier follows one run, so its work
    #: grows with this (8 frames: ~25 ms of CPU a walk program, 16: ~60); a deeper stack
    #: tail-calls the walk more. Tracepoint events (mmap, brk, futex) are far rarer than
    #: malloc's uprobes.
    stack_chunk = 16
    stack_chunk_tp = 8

    def __init__(self, unwind: str = "fp") -> None:
        self.unwind_mode = unwind  # tracer/probes/unwinding.py's UNWIND_MODES
        self._bpf: Any = None
        self._stacks: StackReader | None = None
        self.unwind: UnwindTables | None = None  # None: frame pointers (bpf_get_stack)
        self._code_stops = False  # the program stops a launched target at new code
        self._exit_files: set[tuple[int, int, int]] = set()  # (pid, dev, inode) stopped in _Exit
        #: Another probe set whose unwind table this one walks (set before attaching).
        self.unwind_owner: ProbeSet | None = None
        self._preloaded: bpfprog.Preloaded | None = None  # preload()'s, until _load()
        #: The set (attached first) whose raw_syscalls programs tail-call this one's:
        #: this set's are then put in its sys_next (bpf/alloc.bpf.c), not attached.
        self.syscalls_via: ProbeSet | None = None
        #: This set's own raw_syscalls programs are left unattached (its memory
        #: syscalls come from elsewhere: tracer/probes/syscallsites.py).
        self.skip_raw_syscalls = False

    def program(self, target: Target) -> tuple[str, dict[str, int | str]] | None:
        """(bpf/ source, -D parameters) this set loads for `target` (before the
        unwind and launch parameters _load() adds); None when it loads nothing."""
        raise NotImplementedError

    def prepare(self, target: Target) -> None:
        """Start compiling this set's program now when the cache lacks it (see
        bpfprog.prepare): called for every set before any attaches."""
        program = self.program(target)
        if program is not None:
            bpfprog.prepare(program[0], self._defines(target, program[1]))

    def preload(self, target: Target) -> None:
        """Begin loading this set's program from the cache (see bpfprog.preload), after
        prepare() and before attach(), whose _load() takes it: called for every set, the
        unwind table's owner first (the others' programs point at its maps)."""
        program = self.program(target)
        if program is not None and self._preloaded is None:
            self._preloaded = bpfprog.preload(
                program[0], self._defines(target, program[1]), self._shared_unwind())

    def _shared_unwind(self) -> dict[str, int] | None:
        """The unwind table this set walks when another set owns it (its maps' fds)."""
        owner = self.unwind_owner
        return owner.unwind_maps() if self.unwind_mode != "fp" and owner is not None else None

    def _defines(self, target: Target, defines: dict[str, int | str]) -> dict[str, int | str]:
        """`defines` plus the launch gate's and the unwind mode's parameters."""
        if target.launched:
            defines = {**defines, "WAIT_EXEC": 1}
        if self.unwind_mode != "fp":
            defines = {**defines, "UNWIND_CFI": 1, "UNWIND_DEPTH": self.unwind_depth,
                       "STACK_CHUNK": self.stack_chunk, "STACK_CHUNK_TP": self.stack_chunk_tp,
                       **(kernelbtf.uretprobe_offsets() or {})}
        return defines

    def _load(self, source: str, target: Target, defines: dict[str, int | str]) -> None:
        """Compile bpf/<source> for this target (launched: held at the exec gate).
        An unwind mode other than "fp" walks stacks with CFI rows (bpf/stacks.bpf.h); a
        running target's table is filled before anything is recorded."""
        unwind = self.unwind_mode
        shared = self._shared_unwind()
        preloaded, self._preloaded = self._preloaded, None
        self._bpf = bpfprog.compile_program(source, self._defines(target, defines), shared,
                                            preloaded)
        targets = self._bpf["targets"]
        # a launched command is followed through exec: `env`, `nice` wrap the program
        targets[targets.Key(target.pid)] = targets.Leaf(follow=int(target.launched))
        via = self.syscalls_via
        chained = via is not None and via._chain_syscalls(self._bpf)
        skip = chained or self.skip_raw_syscalls
        self._bpf.attach_tracepoint_functions(skip=SYSCALL_PROGRAMS if skip else ())
        self._stacks = StackReader(self._bpf)
        if unwind != "fp":
            self._code_stops = target.launched
            self.unwind = UnwindTables(self._bpf, unwind, owned=not shared, pid=target.pid)
            if not shared and not target.launched:
                with contextlib.suppress(OSError):
                    self.unwind.update(MapsHistory(target.pid))

    def attach_raw_syscalls(self) -> None:
        """This set's raw_syscalls programs, left out at load (skip_raw_syscalls)."""
        for name in SYSCALL_PROGRAMS:
            self._bpf.attach_raw_tracepoint(tp=name.removeprefix(b"raw_tracepoint__"),
                                           fn_name=name)
        self.skip_raw_syscalls = False

    def _chain_syscalls(self, later: Any) -> bool:
        """Put `later`'s (another unit's, loaded) raw_syscalls programs in this set's
        sys_next, which this set's own tail-call last: every syscall on the machine
        then runs one natrace program per direction instead of one per unit (~75 ns
        each on this project's VM). False when this set has no sys_next, or the kernel
        refuses the programs there: `later` then attaches its own."""
        if self._bpf is None or not self._bpf.has_map("sys_next"):
            return False
        table = self._bpf["sys_next"]
        try:
            for slot, name in enumerate(SYSCALL_PROGRAMS):
                table[slot] = later.funcs[name].fd
        except Exception:  # bcc raises bare Exception for a refused update
            with contextlib.suppress(Exception):
                table.clear()
            return False
        return True

    def unwind_maps(self) -> dict[str, int] | None:
        """The fds of this set's unwind table, for another set to share (None in fp mode
        or when it walks another's); a preloaded program's already."""
        if self._bpf is not None:
            bpf = self._bpf if self.unwind is not None and self.unwind.owned else None
        elif self._preloaded is not None and self._preloaded.shared is None:
            bpf = self._preloaded.bpf if self.unwind_mode != "fp" else None
        else:
            bpf = None
        if bpf is None:
            return None
        return {name: bpf[name].map_fd for name in ("unwind_conf", "unwind_rows")}

    def update_unwind(self, maps: MapsHistory) -> None:
        """A traced process's code changed (the target's, or a child's adopted by
        adopt_unwind): bring its unwind table up to date."""
        if self.unwind is not None and self._bpf is not None:
            self.unwind.update(maps)

    def adopt_unwind(self, pid: int, parent: int) -> None:
        """A child stopped at birth gets an unwind table of its own, its parent's rows
        to begin with (tracer/probes/unwinding.py); update_unwind() keeps it."""
        if self.unwind is not None and self._bpf is not None:
            slot = self.unwind.adopt(pid, parent)
            if slot is not None:
                self._set_proc(pid, unwind=slot)

    def forget_unwind(self, pid: int) -> None:
        """A child has exited: its unwind table's rows and slot are free again."""
        if self.unwind is not None and self._bpf is not None:
            self.unwind.forget(pid)

    def unwind_report(self) -> tuple[dict[str, str], dict[str, int], tuple[int, int]]:
        """(object path -> "cfi" | "fp", walks by why they ended, (captures the stack-id
        cache answered, those it found stale)); empty in fp mode."""
        if self.unwind is None or self._bpf is None:
            return {}, {}, (0, 0)
        return ({path: obj.how for path, obj in self.unwind.objects.items()},
                self.unwind.ends(), self.unwind.cached())

    def take_code_stop(self) -> bool:
        """Was the launched target's last stop one for new code (bpf/target.bpf.h's
        code_stops)? Clears it: the caller updates the table and resumes the target."""
        if self._bpf is None or not self._code_stops:
            return False
        table = self._bpf["code_stops"]
        if table[ctypes.c_int(0)].value != 1:
            return False
        table[ctypes.c_int(0)] = ctypes.c_uint32(0)
        return True

    @contextlib.contextmanager
    def _attaching(self, target: Target, what: str) -> Iterator[None]:
        """Probes placed in the block; on failure every one of this set is removed and
        one error says why: the target died, a stop signal came (AttachInterrupted,
        as raised), or the kernel refused `what`."""
        try:
            yield
        except Exception as err:
            self.detach()
            if isinstance(err, AttachInterrupted):
                raise
            if not target.alive():
                raise exited_while_attaching(target) from None
            raise KernelFeatureError(f"could not attach {what}: {err}") from None

    def _stop_at_exit(self, target: Target) -> None:
        """A launched target stops itself when it calls _Exit (bpf/target.bpf.h), so its
        maps and final counters can be read: the last moment its address space exists
        for certain, after atexit handlers and static and thread_local destructors ran
        (glibc's exit() ends in _exit, an alias of _Exit; musl's in _Exit). Found in
        libc, or in a static executable itself."""
        path = target.exit_library() if target.launched or target.parent else None
        if path is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (target.pid, st.st_dev, st.st_ino) in self._exit_files:
                return  # probed already (a followed exec into the same libc)
            self._exit_files.add((target.pid, st.st_dev, st.st_ino))
        self._bpf.attach_uprobe(name=path, sym="_Exit", fn_name="exit_enter", pid=target.pid)

    def follow_exec(self, target: Target) -> None:
        """A traced process exec'd another program and waits stopped: record that one
        from its first instruction (probes persist across exec: same process, and
        uprobes live on files), in a new address space (its trampoline is not known).
        An exec from a thread other than the main one (Go's syscall.Exec) ended the
        main thread's task, which the kernel's probe links filter on: they are made
        again for the task that holds the pid now."""
        if self._bpf is not None:
            self._bpf.replace_links_of_gone_tasks(target.pid)
        self._set_proc(target.pid, armed=1, stop=0, trampoline=0)

    def _set_proc(self, pid: int, **fields: int) -> None:
        """Change fields of a traced process's `targets` entry (bpf/target.bpf.h)."""
        if self._bpf is None:
            return
        table = self._bpf["targets"]
        key = table.Key(pid)
        try:
            value = table[key]
        except KeyError:
            return
        for name, v in fields.items():
            setattr(value, name, v)
        table[key] = value
        if "armed" in fields or "unwind" in fields:  # threads keep both (bpf/alloc.bpf.c)
            _targets_changed(self._bpf)

    def follow(self, pid: int) -> None:
        """Follow a running target through exec: it stops there (bpf/target.bpf.h) for
        follow_exec(), instead of its exec ending what is recorded."""
        self._set_proc(pid, follow=1)

    def procs(self) -> dict[int, Any]:
        """The traced processes (pid -> bpf/natrace.h's natrace_proc)."""
        if self._bpf is None:
            return {}
        return {k.value: v for k, v in self._bpf["targets"].items()}

    def clear_stop(self, pid: int) -> None:
        """natrace has done what a process stopped itself for (bpf/target.bpf.h)."""
        self._set_proc(pid, stop=0)

    def _arm(self, target: Target) -> None:
        """Call once every probe is attached. A running target records from then on (a
        thread inside malloc meanwhile entered unseen, so its return is ignored, instead
        of leaving a half-seen call that would hide the thread's later calls as nested);
        a launched one records from its gate's exec."""
        if not target.launched:
            self._set_proc(target.pid, armed=1)

    def stack(self, stack_id: int) -> tuple[int, ...]:
        return self._stacks(stack_id) if self._stacks else ()

    def execs(self, pid: int) -> int:
        """exec()s of a traced process since the probes were attached."""
        proc = self.procs().get(pid)
        return 0 if proc is None else int(proc.execs)

    def detach(self) -> None:
        """Remove every probe, in milliseconds. Closing a probe's perf event waits for a
        kernel grace period (~0.06 s, serialized: 3-4 s for natrace's ~55 probes, however
        many threads close them), paid by whoever drops the last reference. A helper
        process gets a copy of every probe's fd first, so bcc's cleanup() here only
        drops references; the helper exits as soon as that is done and the kernel
        tears the probes down in its exit, while natrace goes on (or returns). A
        preloaded program never attached is closed."""
        if self._preloaded is not None:
            self._preloaded.close()
            self._preloaded = None
        if self._bpf is None:
            return
        if self._code_stops:  # the programs outlive this call for a moment: no more stops
            self._bpf["code_stops"][ctypes.c_int(0)] = ctypes.c_uint32(2)
        bpf, self._bpf = self._bpf, None
        # Inert at once: while the helper tears them down, the probes neither record
        # nor stop the target (exit(), code mappings) once natrace has resumed it.
        if "follow_children" in bpf:
            bpf["follow_children"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        bpf["targets"].clear()
        _targets_changed(bpf)
        with _last_references_elsewhere(bpf.probe_fds()):
            bpf.cleanup()


def _targets_changed(bpf: Any) -> None:
    """Move the targets' generation on (bpf/target.bpf.h): after a change of `armed`,
    so no thread goes on trusting what it saw before."""
    gen = bpf["targets_gen"]
    key = ctypes.c_int(0)  # Python's counter; BPF has its own
    gen[key] = ctypes.c_uint64(gen[key].value + 1)


def map_items(table: Any) -> Iterator[tuple[Any, Any]]:
    """A map's entries, fetched in batches where the kernel has batch lookups. Keys of
    a plain C type come as Python ints either way (bcc's batches give ints, items()
    ctypes objects); struct keys stay ctypes structs."""
    try:
        batch = table.items_lookup_batch()
        for key, value in batch:
            yield key, value
    except Exception:  # kernels without batch ops
        for key, value in table.items():
            yield getattr(key, "value", key), value


@contextlib.contextmanager
def _last_references_elsewhere(fds: list[int]) -> Iterator[None]:
    """A helper process holds copies of `fds` until the block ends; without one (it
    could not start) the block just closes them itself, slowly."""
    helper = None
    if fds:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            helper = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", "import sys; sys.stdin.buffer.read()"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=fds, start_new_session=True)
    try:
        yield
    finally:
        if helper is not None and helper.stdin is not None:
            helper.stdin.close()  # EOF: the helper exits, and its exit closes the fds
