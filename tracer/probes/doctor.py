"""Checks behind `natrace doctor`: can this machine and this user trace with eBPF?

One function per check, each returning a CheckResult (name, status, detail, fix).
Nothing here raises for an expected problem and nothing needs privileges to run:
a check that would need them reports so instead of trying. The only slow check,
compiling and loading a trivial BPF program, runs in a child process with a timeout
so that a crash or hang inside libbcc cannot take the doctor down with it.

`check_privileges` is also what tracer.probes.privileges.require_tracing_privileges uses.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "info"]

# Capability bits (include/uapi/linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

PRIVILEGE_FIX = "run natrace with sudo, or give it CAP_BPF+CAP_PERFMON (kernel >= 5.8)"
TRACEFS_DEFAULT = "/sys/kernel/tracing"
TRACEFS_FALLBACK = "/sys/kernel/debug/tracing"

# (category, event, required): every tracepoint natrace attaches to (as a raw
# tracepoint: bpf/target.bpf.h), and the syscall events whose presence says which
# syscalls this kernel has.
TRACEPOINTS: tuple[tuple[str, str, bool], ...] = (
    ("raw_syscalls", "sys_enter", True),
    ("raw_syscalls", "sys_exit", True),
    *(
        ("syscalls", f"sys_enter_{call}", True)
        for call in ("mmap", "munmap", "mremap", "brk", "mprotect", "madvise", "futex")
    ),
    ("exceptions", "page_fault_user", False),
    ("sched", "sched_process_exec", True),
    ("sched", "sched_process_exit", True),
    ("sched", "sched_process_fork", True),
)

# bpf(2) syscall numbers by `uname -m`.
BPF_SYSCALL_NR = {
    "x86_64": 321,
    "amd64": 321,
    "i386": 357,
    "i686": 357,
    "aarch64": 280,
    "arm64": 280,
    "riscv64": 280,
    "loongarch64": 280,
    "armv7l": 386,
    "armv6l": 386,
    "ppc64": 361,
    "ppc64le": 361,
    "s390x": 351,
}

BCC_FIX = (
    "apt install python3-bpfcc (Debian/Ubuntu) or dnf install python3-bcc (Fedora), "
    "and use a venv made with --system-site-packages"
)
HEADERS_FIX = (
    "run scripts/provision.sh as root, or install linux-headers-$(uname -r); if no package "
    "exists for this kernel, link the nearest one: ln -s /usr/src/linux-headers-<ver>-amd64 "
    "/lib/modules/$(uname -r)/build"
)
BCC_LOAD_FIX = (
    "run scripts/provision.sh as root (headers, bcc), then try a bcc tool such as "
    "`execsnoop-bpfcc` to see bcc's own error"
)
BCC_LOAD_TIMEOUT = 60.0

_BCC_PROBE_PROGRAM = r"""
import json, sys
try:
    from bcc import BPF
    b = BPF(text='''
BPF_ARRAY(natrace_doctor, u64, 1);
int natrace_doctor_probe(void *ctx) {
    int key = 0;
    u64 *v = natrace_doctor.lookup(&key);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
''')
    b.load_func("natrace_doctor_probe", BPF.TRACEPOINT)
    b.cleanup()
    result = {"ok": True}
except BaseException as err:
    result = {"ok": False, "error": "%s: %s" % (type(err).__name__, err)}
sys.stdout.write(json.dumps(result))
"""


@dataclass(frozen=True)
class CheckResult:
    """What one check found. `fix` is a one-line remedy, set for failures (and some warnings)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


# --- privileges -------------------------------------------------------------


def effective_capabilities(status_text: str | None = None) -> int | None:
    """CapEff of this process as a bit mask, from /proc/self/status (or the given text)."""
    if status_text is None:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as f:
                status_text = f.read()
        except OSError:
            return None
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status_text, re.MULTILINE)
    return int(match.group(1), 16) if match else None


def _has(caps: int, bit: int) -> bool:
    return bool(caps >> bit & 1)


def check_privileges(status_text: str | None = None, euid: int | None = None) -> CheckResult:
    """Root, CAP_SYS_ADMIN, or CAP_BPF+CAP_PERFMON in the effective set."""
    name = "privileges"
    euid = os.geteuid() if euid is None else euid
    caps = effective_capabilities(status_text)
    who = "root" if euid == 0 else f"euid {euid}"
    if caps is None:
        if euid == 0:
            return CheckResult(
                name, "warn", "root, but CapEff is unreadable: assuming it is enough"
            )
        return CheckResult(name, "fail", f"{who}, CapEff unreadable", PRIVILEGE_FIX)
    if _has(caps, CAP_BPF) and _has(caps, CAP_PERFMON):
        detail = who if euid == 0 else f"{who} with CAP_BPF+CAP_PERFMON"
        return CheckResult(name, "ok", detail)
    if _has(caps, CAP_SYS_ADMIN):
        detail = who if euid == 0 else f"{who} with CAP_SYS_ADMIN"
        return CheckResult(name, "ok", detail)
    missing = [
        n for n, b in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON)) if not _has(caps, b)
    ]
    detail = f"{who} without {', '.join(missing)} or CAP_SYS_ADMIN"
    if euid == 0:
        detail += " (capabilities dropped, e.g. by a container)"
    return CheckResult(name, "fail", detail, PRIVILEGE_FIX)


# --- kernel -----------------------------------------------------------------


def parse_kernel_version(release: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_kernel(release: str | None = None) -> CheckResult:
    """Kernel >= 5.0; ring buffers from 5.8, perf buffers before."""
    name = "kernel"
    release = platform.release() if release is None else release
    version = parse_kernel_version(release)
    if version is None:
        return CheckResult(name, "warn", f"cannot parse kernel release {release!r}")
    if version < (5, 0):
        return CheckResult(
            name,
            "fail",
            f"{release}: natrace needs Linux >= 5.0",
            "upgrade the kernel to 5.0 or later",
        )
    if version < (5, 8):
        return CheckResult(name, "ok", f"{release} (perf buffers; ring buffers need 5.8)")
    return CheckResult(name, "ok", f"{release} (ring buffers available)")


def check_bpf_syscall(machine: str | None = None) -> CheckResult:
    """bpf(BPF_MAP_CREATE) of a one-entry array, then close the fd."""
    name = "bpf syscall"
    machine = platform.machine() if machine is None else machine
    nr = BPF_SYSCALL_NR.get(machine)
    if nr is None:
        return CheckResult(name, "warn", f"bpf() syscall number unknown for {machine}: not checked")
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, map_flags;
    # the rest must be zero. 64 bytes is smaller than any kernel's union, which is allowed.
    attr = (ctypes.c_uint32 * 16)(2, 4, 4, 1, 0)  # BPF_MAP_TYPE_ARRAY, 4-byte key and value
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(
            ctypes.c_long(nr),
            ctypes.c_long(0),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
        err = ctypes.get_errno()
    except (OSError, AttributeError) as exc:
        return CheckResult(name, "warn", f"cannot call syscall(2) via ctypes: {exc}")
    if fd >= 0:
        os.close(fd)
        return CheckResult(name, "ok", "BPF_MAP_CREATE works")
    detail = f"BPF_MAP_CREATE failed: {os.strerror(err)}"
    if err in (1, 13):  # EPERM, EACCES
        unpriv = _read_text("/proc/sys/kernel/unprivileged_bpf_disabled")
        if unpriv is not None:
            detail += f" (kernel.unprivileged_bpf_disabled={unpriv})"
        fix = (
            PRIVILEGE_FIX + "; unprivileged bpf() is off (sysctl kernel.unprivileged_bpf_disabled)"
        )
    elif err == 38:  # ENOSYS
        fix = "use a kernel built with CONFIG_BPF_SYSCALL=y"
    else:
        fix = "check dmesg and `ulimit -l` (older kernels charge BPF maps to RLIMIT_MEMLOCK)"
    return CheckResult(name, "fail", detail, fix)


# --- tracefs and events -----------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _mount_types() -> dict[str, str]:
    """Mount point -> file system type, from /proc/self/mounts."""
    text = _read_text("/proc/self/mounts") or ""
    mounts = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts[fields[1].replace("\\040", " ")] = fields[2]
    return mounts


def _probe_tracefs(path: str) -> tuple[bool, str]:
    """(usable, why not): a tracefs is usable when its events/ directory can be listed."""
    try:
        os.listdir(os.path.join(path, "events"))
    except PermissionError:
        mounted = _mount_types().get(os.path.normpath(path)) == "tracefs"
        state = "mounted but permission denied" if mounted else "permission denied"
        return False, f"{path}: {state}"
    except OSError:
        return False, f"{path}: not mounted"
    return True, path


def find_tracefs(path: str | None = None) -> tuple[str | None, CheckResult]:
    """The tracefs to use (given path, else default, else debugfs's) and the check result."""
    name = "tracefs"
    candidates = [path] if path else [TRACEFS_DEFAULT, TRACEFS_FALLBACK]
    problems = []
    for candidate in candidates:
        usable, why = _probe_tracefs(candidate)
        if usable:
            return candidate, CheckResult(name, "ok", f"mounted at {candidate}")
        problems.append(why)
    detail = "; ".join(problems)
    if any("permission denied" in p for p in problems):
        return None, CheckResult(name, "fail", detail, PRIVILEGE_FIX)
    target = path or TRACEFS_DEFAULT
    return None, CheckResult(name, "fail", detail, f"mount -t tracefs tracefs {target}")


def check_uprobes(tracefs: str | None) -> CheckResult:
    name = "uprobes"
    if tracefs and os.path.exists(os.path.join(tracefs, "uprobe_events")):
        return CheckResult(name, "ok", f"{tracefs}/uprobe_events")
    if os.path.isdir("/sys/bus/event_source/devices/uprobe"):
        return CheckResult(name, "ok", "uprobe PMU (/sys/bus/event_source/devices/uprobe)")
    return CheckResult(
        name,
        "fail",
        "no uprobe_events in tracefs and no uprobe PMU",
        "use a kernel built with CONFIG_UPROBE_EVENTS=y",
    )


def check_tracepoints(tracefs: str | None) -> CheckResult:
    name = "tracepoints"
    if tracefs is None:
        return CheckResult(name, "info", "not checked: tracefs unavailable")
    events = os.path.join(tracefs, "events")
    missing_required: list[str] = []
    missing_optional: list[str] = []
    for category, event, required in TRACEPOINTS:
        if not os.path.isdir(os.path.join(events, category, event)):
            (missing_required if required else missing_optional).append(f"{category}:{event}")
    found = len(TRACEPOINTS) - len(missing_required) - len(missing_optional)
    if missing_required:
        return CheckResult(
            name,
            "fail",
            f"missing {', '.join(missing_required + missing_optional)}",
            "use a kernel with CONFIG_FTRACE_SYSCALLS=y and tracepoints enabled",
        )
    if missing_optional:
        return CheckResult(
            name,
            "warn",
            f"{found}/{len(TRACEPOINTS)} present; missing {', '.join(missing_optional)} "
            "(page-fault attribution unavailable)",
        )
    return CheckResult(name, "ok", f"all {len(TRACEPOINTS)} present")


def check_kprobes(tracefs: str | None) -> CheckResult:
    """Informational only: natrace never uses kprobes."""
    name = "kprobes"
    present = os.path.isdir("/sys/bus/event_source/devices/kprobe") or bool(
        tracefs and os.path.exists(os.path.join(tracefs, "kprobe_events"))
    )
    state = "available" if present else "absent"
    return CheckResult(name, "info", f"{state} (natrace does not need them)")


def check_btf() -> CheckResult:
    name = "btf"
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        return CheckResult(name, "info", "/sys/kernel/btf/vmlinux present")
    return CheckResult(
        name, "warn", "no /sys/kernel/btf/vmlinux (fine for bcc; CO-RE tools need it)"
    )


def check_headers(release: str | None = None) -> CheckResult:
    name = "kernel headers"
    release = platform.release() if release is None else release
    include = f"/lib/modules/{release}/build/include"
    if not os.path.isdir(include):
        return CheckResult(name, "fail", f"{include} not found", HEADERS_FIX)
    where = os.path.realpath(include)
    version = headers_release(include)
    if version is None or version == release:
        return CheckResult(name, "ok", where)
    return CheckResult(
        name, "warn",
        f"{where} are the headers of kernel {version}, not of the running {release}: "
        "natrace's programs (uprobes, tracepoints, maps) work with them; a program that "
        "read kernel structures could misread them",
        f"install linux-headers-{release} when your distribution has it")


def headers_release(include: str) -> str | None:
    """The kernel release a headers tree was made for (its generated utsrelease.h)."""
    try:
        with open(os.path.join(include, "generated", "utsrelease.h")) as fh:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', fh.read())
    except OSError:
        return None
    return m.group(1) if m else None


# --- bcc --------------------------------------------------------------------


def check_bcc_import() -> CheckResult:
    name = "bcc import"
    try:
        import bcc  # type: ignore[import-not-found,unused-ignore]
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        detail = f"{type(exc).__name__}: {_first_line(str(exc))}"
        if os.path.isdir("/usr/lib/python3/dist-packages/bcc"):
            detail += f"; the OS's bcc is installed but {sys.executable} does not see it"
        return CheckResult(name, "fail", detail, BCC_FIX)
    where = getattr(bcc, "__file__", None) or "?"
    if not hasattr(bcc, "BPF"):
        return CheckResult(
            name,
            "fail",
            f"{where} is the unrelated PyPI package named 'bcc', not the BPF Compiler Collection",
            f"pip uninstall bcc; then {BCC_FIX}",
        )
    return CheckResult(name, "ok", os.path.dirname(where))


def check_bcc_load(timeout: float = BCC_LOAD_TIMEOUT) -> CheckResult:
    """Compile and load a trivial program with a map, in a child process."""
    name = "bcc load"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _BCC_PROBE_PROGRAM],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        detail = f"compiling a trivial program took over {timeout:.0f} s"
        return CheckResult(name, "fail", detail, BCC_LOAD_FIX)
    except OSError as exc:
        return CheckResult(name, "fail", f"cannot start {sys.executable}: {exc}", BCC_LOAD_FIX)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        result = {"ok": False, "error": f"child exited with {proc.returncode}"}
    if result.get("ok"):
        return CheckResult(name, "ok", "compiled and loaded a program with a map")
    error = _first_line(str(result.get("error", "")))
    compiler = next((ln.strip() for ln in proc.stderr.splitlines() if "error" in ln.lower()), "")
    if compiler:
        error = f"{error} ({compiler})"
    text = (error + proc.stderr).lower()
    if "header" in text:
        fix = HEADERS_FIX
    elif "operation not permitted" in text or "permission denied" in text:
        fix = PRIVILEGE_FIX
    else:
        fix = BCC_LOAD_FIX
    return CheckResult(name, "fail", error, fix)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "(no message)"


# --- all of them ------------------------------------------------------------


def run_checks(tracefs: str | None = None) -> list[CheckResult]:
    """Every check, in display order. Never raises for an expected problem."""
    privileges = check_privileges()
    results = [privileges, check_kernel(), check_bpf_syscall()]
    tracefs_path, tracefs_result = find_tracefs(tracefs)
    results += [
        tracefs_result,
        check_uprobes(tracefs_path),
        check_tracepoints(tracefs_path),
        check_kprobes(tracefs_path),
        check_btf(),
        check_headers(),
    ]
    bcc_import = check_bcc_import()
    results.append(bcc_import)
    if bcc_import.failed:
        results.append(CheckResult("bcc load", "info", "not tried: bcc is not importable"))
    elif privileges.failed:
        results.append(CheckResult("bcc load", "info", "not tried: needs privileges"))
    else:
        results.append(check_bcc_load())
    return results


def tracing_will_work(results: Iterable[CheckResult]) -> bool:
    return not any(r.failed for r in results)
