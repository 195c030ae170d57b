"""natrace never harms its target and never reports wrong numbers silently: clean
detach on signals and on SIGKILL, targets that exec, fork, spawn 1,000 threads or
die while natrace attaches, two natraces at once, full maps, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from allocfixtures import build
from framecheck import seen
from tracing import NATRACE, attach, patched_code_bytes, release, waiting

pytestmark = pytest.mark.bpf


def sites_by_function(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {s["function"]: (s["bytes"], s["blocks"]) for s in report["sites"]
            if s["kind"] == "malloc" and s["function"]}


def wait_until_clean(pid: int, seconds: float = 120) -> int:
    """Bytes still patched once every probe is gone, or at the deadline (the kernel
    removes uprobes one grace period at a time: seconds on a loaded machine)."""
    deadline = time.monotonic() + seconds
    while (left := patched_code_bytes(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_detaches_and_still_reports(signum: int, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with waiting(str(build().leaky), "--wait") as target:
        tracer = attach(target.pid, "--duration", "10m", "--json", "-o", str(out))
        assert patched_code_bytes(target.pid) > 0  # probes really are in place
        release(target)
        tracer.send_signal(signum)
        _, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        assert sites_by_function(json.loads(out.read_text()))["leak_malloc"] == (10_000, 10)
        assert wait_until_clean(target.pid) == 0  # torn down once natrace returned
        assert target.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sent_to_run_alone_ends_the_command_too(signum: int,
                                                               tmp_path: Path) -> None:
    """`kill` of `natrace run` (not a terminal's Ctrl-C to the whole group) used to leave
    natrace waiting, report written, for a command nobody had told to stop."""
    out = tmp_path / "r.json"
    tracer = subprocess.Popen(
        [NATRACE, "run", "--json", "-o", str(out), "--", str(build().leaky), "--wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # no controlling terminal: only natrace gets the signal
    try:
        release(tracer, expect_ready=True)
        tracer.send_signal(signum)
        tracer.wait(timeout=120)  # stdin stays open: the fixture would exit at its close
    finally:
        tracer.kill()
    assert tracer.stderr is not None
    assert tracer.returncode == 128 + signum, tracer.stderr.read()  # the command's death
    assert sites_by_function(json.loads(out.read_text()))["leak_malloc"] == (10_000, 10)


def compiles(natrace_pid: int) -> dict[int, str]:
    """natrace's compiling children: pid -> the request each read on stdin (JSON, with
    the source text)."""
    out = {}
    for child in psutil.Process(natrace_pid).children():
        with contextlib.suppress(psutil.Error, OSError):
            if "tracer.probes.bpfcompile" in " ".join(child.cmdline()):
                out[child.pid] = Path(f"/proc/{child.pid}/fd/0").read_text()
    return out


def compiling(natrace_pid: int) -> bool:
    """Is natrace's BPF compiler child running (natrace is inside its attach)?"""
    for child in psutil.Process(natrace_pid).children():
        with contextlib.suppress(psutil.Error):
            if "tracer.probes.bpfcompile" in " ".join(child.cmdline()):
                return True
    return False


def start_uncached(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """natrace with an empty cache: every BPF program is compiled (seconds each), so a
    signal can be sent while it attaches."""
    return subprocess.Popen([NATRACE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_attaching_removes_what_was_placed(signum: int,
                                                               tmp_path: Path) -> None:
    with waiting(str(build().leaky), "--wait") as target:
        tracer = start_uncached(tmp_path, "snapshot", "-p", str(target.pid), "--duration",
                                "10m", "--json")
        # every program's compile starts at once: hold all but alloc.bpf.c's, so the
        # malloc probes get placed while natrace waits for the next program
        held: set[int] = set()
        while not (held and patched_code_bytes(target.pid) > 0):
            assert tracer.poll() is None, tracer.communicate()
            for pid, source in compiles(tracer.pid).items():
                if "malloc_enter" not in source and pid not in held:
                    os.kill(pid, signal.SIGSTOP)
                    held.add(pid)
            time.sleep(0.02)
        tracer.send_signal(signum)
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 128 + signum, err
        assert out == ""
        assert err == (f"natrace: stopped by {signal.Signals(signum).name} while attaching: "
                       "nothing was traced, and every probe placed was removed\n")
        assert wait_until_clean(target.pid) == 0  # the kernel's teardown may lag natrace
        release(target)  # and the target runs on
        assert target.poll() is None


def test_a_stop_signal_while_attaching_for_run_never_starts_the_command(
        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    tracer = start_uncached(tmp_path, "run", "--", "/usr/bin/touch", str(marker))
    while not compiling(tracer.pid):
        assert tracer.poll() is None, tracer.communicate()
        time.sleep(0.02)
    children = psutil.Process(tracer.pid).children()  # the gate, compiles, ld.so --list
    tracer.send_signal(signal.SIGINT)
    _, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 130, err
    assert err.startswith("natrace: stopped by SIGINT while attaching")
    assert not marker.exists()
    assert children and not [c for c in children if running(c)]  # none left behind


def bpf_fds(pid: int) -> int:
    """BPF objects natrace holds open: its attach has begun once it holds one."""
    with contextlib.suppress(OSError):
        return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("anon_inode:bpf")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    return 0


def test_a_stop_signal_at_any_moment_of_an_attach_gives_one_line() -> None:
    """The handler used to raise inside whatever code ran: pyelftools turned that into
    'no known allocator', capstone's half-built disassembler printed an ignored
    exception. Signals spread over a warm attach's steps (from the first BPF object
    on: ~0.15 s here) each give either the one line and 130, or a trace stopped
    cleanly."""
    seen_codes = set()
    with waiting(str(build().leaky), "--wait") as target:
        for step in range(10):
            tracer = subprocess.Popen([NATRACE, "snapshot", "-p", str(target.pid), "--duration",
                                       "10m", "--json", "-o", os.devnull],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while not bpf_fds(tracer.pid) and tracer.poll() is None:
                time.sleep(0.002)
            time.sleep(step * 0.02)
            tracer.send_signal(signal.SIGINT)
            out, err = tracer.communicate(timeout=60)
            seen_codes.add(tracer.returncode)
            if tracer.returncode == 130:
                assert err == ("natrace: stopped by SIGINT while attaching: nothing was "
                               "traced, and every probe placed was removed\n")
            else:
                assert tracer.returncode == 0, err
                assert "Traceback" not in err and "Exception" not in err, err
            assert out == ""
        assert wait_until_clean(target.pid) == 0
    assert 130 in seen_codes


def running(process: psutil.Process) -> bool:
    """Still running, not a zombie on its way to being reaped (a pid reused since
    is another process: is_running compares start times)."""
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def test_sigkill_of_natrace_leaves_no_probe_behind() -> None:
    with waiting(str(build().leaky), "--wait") as target:
        tracer = attach(target.pid, "--duration", "10m")
        assert patched_code_bytes(target.pid) > 0
        tracer.kill()
        tracer.wait()
        assert wait_until_clean(target.pid) == 0  # the kernel dropped every uprobe
        release(target)  # and the target runs on
        assert target.poll() is None


def test_attach_to_a_process_busy_in_malloc(tmp_path: Path) -> None:
    """Probes attach one by one while the target calls malloc: a call whose entry was
    seen but not its return must not make the thread's later calls look nested."""
    out = tmp_path / "r.json"
    with waiting(str(build().busy)) as target:
        tracer = attach(target.pid, "--duration", "10m", "--json", "-o", str(out))
        time.sleep(1)
        release(target)
        tracer.send_signal(signal.SIGINT)
        assert tracer.wait(timeout=60) == 0
    report = json.loads(out.read_text())
    assert sites_by_function(report)["after_busy"] == (42 * 42, 42)
    assert report["calls"]["allocs"] > 1000


def test_two_natraces_on_one_target_both_exact(tmp_path: Path) -> None:
    with waiting(str(build().leaky), "--wait") as target:
        first = attach(target.pid, "--duration", "10m", "--json", "-o", str(tmp_path / "1"))
        second = attach(target.pid, "--duration", "10m", "--json", "-o", str(tmp_path / "2"))
        release(target)
        for tracer in (first, second):
            tracer.send_signal(signal.SIGINT)
            assert tracer.wait(timeout=60) == 0
        for name in ("1", "2"):
            sites = sites_by_function(json.loads((tmp_path / name).read_text()))
            assert sites["leak_malloc"] == (10_000, 10)
            assert sites["thread_leak"] == (20_000, 100)
        assert wait_until_clean(target.pid) == 0


def test_a_thousand_threads(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", str(build().threads)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert sites_by_function(report)["thread_body"] == (100_000, 1_000)
    assert not any(report["loss"].values())


def test_run_follows_an_exec_to_the_last_program(tmp_path: Path) -> None:
    """What the first program allocated went with its address space at exec: the
    report is of the program it exec'd, and says so."""
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", str(build().execer),
                    "/bin/sleep", "0.5"], check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert report["command"] == "/bin/sleep 0.5"
    assert any("followed process" in n for n in report["notes"]), report["notes"]
    assert not any("exec'd from a thread" in n for n in report["notes"]), report["notes"]
    assert "before_exec" not in sites_by_function(report)


@pytest.mark.parametrize("thread", [False, True], ids=["main thread", "other thread"])
def test_an_exec_is_followed_exactly_from_any_thread(thread: bool, tmp_path: Path) -> None:
    """Go's syscall.Exec execs from a thread other than the main one. The kernel filters
    natrace's probe links by the task they were made for, the main thread's, which ends
    in that exec (de_thread): natrace makes them again for the task that holds the pid
    now, so the new program is exact either way (tests/fixtures/src/plain.c's leaks)."""
    from allocfixtures import build_trees
    from test_processes import own_sites

    plain = build_trees().plain
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--", str(build().execer),
                    *(["--thread"] if thread else []), str(plain)], check=True,
                   capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    [proc] = report["processes"]
    assert proc["command"] == str(plain) and proc["exited"]
    assert own_sites(proc) == {"leak_plain": (1_500, 5, 5), "leak_strdup": (84, 7, 7)}
    assert report["calls"]["allocs"] == 12 and not any(report["loss"].values())
    assert any(n.startswith(f"followed process {proc['pid']} through exec") for n in
               report["notes"]), report["notes"]
    assert not any("exec'd from a thread" in n for n in report["notes"]), report["notes"]


def test_forked_children_are_said_to_be_untraced(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--no-children", "--",
                    str(build().execer), "--fork"], check=True, capture_output=True,
                   timeout=120)
    report = json.loads(out.read_text())
    assert any("not traced" in n for n in report["notes"]), report["notes"]


def test_a_child_that_ran_and_exited_is_named(tmp_path: Path) -> None:
    """sh -c 'a; b' runs a in a child natrace does not trace (--no-children): the report
    says which, though it exited long before the report (threads are never taken for
    children)."""
    out = tmp_path / "r.json"
    subprocess.run([NATRACE, "run", "--json", "-o", str(out), "--no-children", "--", "sh", "-c",
                    f"{build().threads}; true"], check=True, capture_output=True, timeout=120)
    notes = json.loads(out.read_text())["notes"]
    assert len(notes) == 1 and notes[0].startswith("1 child process(es) of "), notes
    assert notes[0].endswith("(threads, exited)"), notes


def test_full_outstanding_map_is_counted_and_shown(tmp_path: Path) -> None:
    for fmt in ("text", "json"):
        out = tmp_path / fmt
        proc = subprocess.run([NATRACE, "run", "--max-allocs", "1024", "-o", str(out),
                               *(["--json"] if fmt == "json" else []), "--",
                               str(build().leaky), "--many", "5000"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if fmt == "text":
            assert "allocations not tracked: outstanding map full" in out.read_text()
        else:
            loss = json.loads(out.read_text())["loss"]
            assert loss["untracked"] > 0 and loss["untracked_bytes"] >= loss["untracked"]


def test_an_attached_target_that_exits_right_after_a_dlopen_is_said_or_named() -> None:
    """leaky dlopens plugin.node, leaks 5 x 444 B from it and exits at once (stdin
    closed): natrace, not holding an attached process at its exit, nearly always finds
    its maps gone. Then the last maps read are used and the report says so, rather
    than silently charging plugin_leak's bytes to main; when natrace read the maps in
    time, plugin_leak is named. Either way every byte is exact."""
    built = build()
    with waiting(str(built.leaky), "--wait", "--plugin", str(built.plugin)) as target:
        tracer = attach(target.pid, "--json", "--duration", "10m")
        assert target.stdin is not None
        target.stdin.close()  # released, and no second wait
        target.wait(timeout=60)
        out, err = tracer.communicate(timeout=120)
    assert tracer.returncode == 0, err
    report = json.loads(out)
    sites = sites_by_function(report)
    note = (f"process {target.pid} exited before natrace could read its memory map again: "
            "frames in code it mapped last (e.g. a library dlopen'ed just before exiting) "
            "could not be named, and their bytes are charged to their nearest caller "
            "natrace could name")
    if note in report["notes"]:
        assert sites["main"] == (2220, 5) and "plugin_leak" not in sites
    else:
        assert sites["plugin_leak"] == (2220, 5) and "main" not in sites
    assert sites["leak_malloc"] == (10_000, 10)


def test_target_dying_while_natrace_attaches() -> None:
    short = subprocess.Popen(["sleep", "0.3"])
    proc = subprocess.run([NATRACE, "snapshot", "-p", str(short.pid), "--duration", "5"],
                          capture_output=True, text=True, timeout=60)
    short.wait()
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    # natrace either catches it dying during the attach or already dead (a zombie)
    assert lines[0] in (f"natrace: process {short.pid} exited while natrace attached",
                        f"natrace: process {short.pid} is a zombie: it has exited and has "
                        "no memory to trace"), lines


GATE = """\
import os, sys


class _Gate:
    \"\"\"Holds natrace's import of click (from tracer.cli) until the test has signalled.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "click":
            sys.meta_path.remove(self)
            os.write(2, b"natrace-test: importing click\\n")
            os.read(0, 1)  # the SIGINT arrives here (no byte ever comes)
        return None


sys.meta_path.insert(0, _Gate())
"""


def interrupted_while_importing(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`natrace ARGS` sent SIGINT while Python imports click for natrace's CLI: a
    sitecustomize on PYTHONPATH holds that import (a meta path finder that waits on
    stdin), so the signal lands inside it whatever the machine's load. (Pacing natrace by
    a nearly full stderr pipe raced: a reader descheduled after a read let natrace write
    the rest and finish.)"""
    (tmp_path / "sitecustomize.py").write_text(GATE)
    proc = subprocess.Popen([NATRACE, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.stdin is not None and proc.stderr is not None
    try:
        line = proc.stderr.readline()
        assert line == "natrace-test: importing click\n", line + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", rest)


def test_a_ctrl_c_while_natrace_imports_is_exit_130_without_a_traceback(
        tmp_path: Path) -> None:
    done = interrupted_while_importing(tmp_path, "--version")
    assert done.returncode == 130, done.stderr
    assert done.stderr == ""


def zombie() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    time.sleep(0.2)
    return pid


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["snapshot", "-p", "999999999"], 3, "no process with PID 999999999"),
    (["snapshot", "-p", "abc"], 2, "is not a valid integer"),
    (["snapshot", "-p", "2"], 3, "kernel thread"),
    (["snapshot", "-p", "ZOMBIE"], 3, "zombie"),
    (["snapshot", "-p", "1", "--duration", "-1"], 2, "not a duration"),
    (["snapshot", "-p", "1", "--duration", "0"], 2, "more than zero"),
    (["run", "--sample", "lots", "--", "true"], 2, "not a size"),
    (["run", "--min-age", "soon", "--", "true"], 2, "not a duration"),
    (["run", "--charge-to", "everyone", "--", "true"], 2, "--charge-to"),
    (["run", "--max-allocs", "5", "--", "true"], 2, "--max-allocs"),
    (["run", "--lock-share", "-3", "--", "true"], 2, "--lock-share"),
    (["run"], 2, "Missing argument"),
    (["run", "--", "/nonexistent/cmd"], 3, "command not found"),
    (["run", "--", "PLAIN"], 3, "not executable"),
    (["run", "--", "NOTELF"], 3, "not an ELF program"),
    (["report", "/nonexistent.natrace"], 2, ""),
    (["snapshot", "-p"], 2, "requires an argument. (see 'natrace snapshot --help')"),
    (["guard", "-p", "1", "--rss-limit"], 2, "(see 'natrace guard --help')"),
])
def test_bad_input_is_one_line_with_its_exit_code(args: list[str], code: int, needle: str,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    reaped = None
    if "ZOMBIE" in args:
        reaped = zombie()
        args = [str(reaped) if a == "ZOMBIE" else a for a in args]
    for name, mode in (("PLAIN", 0o644), ("NOTELF", 0o755)):
        if name in args:
            path = tmp_path / name
            path.write_text("just text\n")
            path.chmod(mode)
            args = [str(path) if a == name else a for a in args]
    proc = subprocess.run([NATRACE, *args[:1], "-o", str(out), *args[1:]]
                          if args[0] == "run" and len(args) > 1 else [NATRACE, *args],
                          capture_output=True, text=True, timeout=60)
    if reaped:
        os.waitpid(reaped, 0)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("natrace: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written


def test_a_thread_id_is_traced_as_its_process() -> None:
    proc = subprocess.Popen(["python3", "-c", "import threading, time\n"
                             "t = threading.Thread(target=time.sleep, args=(600,))\n"
                             "t.start(); print(t.native_id, flush=True); t.join()"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tid = int(proc.stdout.readline())
        assert tid != proc.pid
        out = subprocess.run([NATRACE, "snapshot", "-p", str(tid), "--duration", "1",
                              "--json"], capture_output=True, text=True, timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode == 0, out.stderr
    report = seen("natrace snapshot", json.loads(out.stdout))
    note = (f"{tid} is a thread of process {proc.pid}: natrace traces the whole process "
            f"{proc.pid} (uprobes see every thread)")
    assert report["pid"] == proc.pid and note in report["notes"]
    assert f"natrace: note: {note}" in out.stderr.splitlines()


def test_a_stopped_target_is_said_to_be_stopped() -> None:
    with waiting(str(build().leaky), "--wait") as target:
        os.kill(target.pid, signal.SIGSTOP)
        out = subprocess.run([NATRACE, "snapshot", "-p", str(target.pid), "--duration", "1",
                              "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    note = (f"process {target.pid} is stopped (state T: SIGSTOP, Ctrl-Z or a debugger): it "
            f"allocates nothing until it continues (kill -CONT {target.pid})")
    assert note in json.loads(out.stdout)["notes"]
    assert f"natrace: note: {note}" in out.stderr.splitlines()


def test_unreadable_maps_are_not_called_a_kernel_thread() -> None:
    """PID 1 is such a process on this project's VMs (root lacks ptrace access to it);
    where PID 1 is readable (a usual systemd host) there is nothing to show."""
    try:
        with open("/proc/1/maps") as fh:
            fh.read(1)
        pytest.skip("/proc/1/maps is readable here")
    except PermissionError:
        pass
    out = subprocess.run([NATRACE, "snapshot", "-p", "1", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert out.stderr.startswith("natrace: cannot read /proc/1/maps (Permission denied): ")
    assert "kernel thread" not in out.stderr and out.stderr.count("\n") == 1
