"""Refuse early, in one line, when this process may not load BPF programs.

The capability logic lives in tracer.probes.doctor.check_privileges: doctor and the
tracing commands use one implementation.
"""

from __future__ import annotations

from tracer.errors import PrivilegeError
from tracer.probes.doctor import check_privileges

PRIVILEGE_MESSAGE = "tracing needs root or CAP_BPF+CAP_PERFMON: run natrace with sudo"


def require_tracing_privileges() -> None:
    """Raise PrivilegeError (exit code 2) unless root, CAP_SYS_ADMIN, or CAP_BPF+CAP_PERFMON."""
    if check_privileges().failed:
        raise PrivilegeError(PRIVILEGE_MESSAGE)
