"""The triage sections of the text and JSON reports: locks, memory syscalls, page faults."""

from __future__ import annotations

from typing import Any

from tracer.model.callsite import CallSite
from tracer.model.locks import ERROR_EXPLANATIONS, FutexSite, Lock, LockReport
from tracer.model.snapshot import LOSS_DESCRIPTIONS, Snapshot
from tracer.model.syscalls import SyscallSummary

SITES_PER_ROW = 3


def duration(ns: float) -> str:
    """Nanoseconds as a person reads them."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.0f} ns"


def _where(site: CallSite) -> str:
    frame = site.frame
    module = f" [{frame.module_name}]" if frame else ""
    via = f" via {site.via}" if site.via else ""
    return f"{site.label()}{module}{via}"


def thread_seconds(ns: int) -> str:
    """Blocked time summed over threads: "18.7 thread-s" (can exceed the time traced)."""
    return f"{ns / 1e9:.3g} thread-s"


# -- text --------------------------------------------------------------------------------

def text_lines(snap: Snapshot, top: int = 10) -> list[str]:
    """The triage sections (empty when the triage probes did not run)."""
    out: list[str] = []
    if snap.locks is not None:
        out += [""] + _locks_text(snap.locks, top)
    if snap.syscalls is not None:
        out += [""] + _syscalls_text(snap.syscalls, top)
    if snap.faults is not None:
        out.append("")
        if not snap.faults.available:
            out.append("Page faults: not traced (this kernel has no exceptions:page_fault_user)")
        else:
            out.append(f"Page faults (user): {snap.faults.total:,}, by call site (who touches "
                       "new memory grows RSS):")
            for fs in snap.faults.sites[:top]:
                out.append(f"  {fs.faults:>12,} {_pct(fs.faults, snap.faults.total):>6}  "
                           f"{_where(fs.site)}")
    lost = {k: v for k, v in snap.triage_loss.items() if v}
    if lost:
        out.append("")
        out.append("Not recorded by the triage probes:")
        out += [f"  {v:>12,}  {LOSS_DESCRIPTIONS.get(k, k)}" for k, v in lost.items()]
    return out


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _locks_text(report: LockReport, top: int) -> list[str]:
    contended = report.contended()
    waited = report.waited_on()
    out = [f"Locks (futex words): {len(report.locks)} seen, {len(waited)} waited on, "
           f"{len(contended)} contended (rules: 'share' = waiters blocked more than "
           f"{report.share_threshold:g} thread-seconds per second traced, 'p99' = p99 wait "
           f"> {duration(report.p99_threshold_ns)}); words never waited on are not listed"]
    for lock in waited[:top]:
        out += _lock_text(lock)
    errors = report.errors()
    if errors:
        out.append("  Futex errors, explained:")
        for name, n in sorted(errors.items(), key=lambda kv: -kv[1]):
            out.append(f"    {name:9} {n:>10,}  {ERROR_EXPLANATIONS.get(name, '')}")
    return out


def _lock_text(lock: Lock) -> list[str]:
    state = f"CONTENDED ({', '.join(lock.rules)})" if lock.contended else "ok"
    scope = "private" if lock.private else "shared"
    out = [f"  {state:22} {lock.kind} {lock.uaddr:#x} ({scope}): {lock.waits:,} waits, "
           f"{thread_seconds(lock.wait_ns)} blocked ({lock.share:.2f} threads waiting on "
           "average), "
           f"p50 {duration(lock.p(0.5))}, p99 {duration(lock.p(0.99))}, "
           f"max {duration(lock.max_ns)}; {lock.wake_calls:,} wake calls woke "
           f"{lock.woken:,} threads"]
    for fs in lock.waiters[:SITES_PER_ROW]:
        out.append(f"      waits {fs.calls:>9,} {duration(fs.ns):>9}  {_where(fs.site)}"
                   + _errors_suffix(fs))
    for fs in lock.wakers[:SITES_PER_ROW]:
        out.append(f"      {'/'.join(fs.commands).lower():5} {fs.calls:>9,} "
                   f"{'woke ' + format(fs.woken, ','):>9}  {_where(fs.site)}" + _errors_suffix(fs))
    return out


def _errors_suffix(fs: FutexSite) -> str:
    errs = [f"{k} {v:,}" for k, v in fs.errors.items() if v]
    return f"  errors: {', '.join(errs)}" if errs else ""


def _syscalls_text(summary: SyscallSummary, top: int) -> list[str]:
    out = [f"Memory syscalls (strace -c style, {summary.duration:.1f} s traced):",
           f"  {'SYSCALL':9} {'CALLS':>10} {'CALLS/S':>9} {'ERRORS':>7} {'TIME':>9} "
           f"{'BYTES':>15}  ERRNO"]
    for sc in summary.syscalls:
        errs = ", ".join(f"{k} {v:,}" for k, v in sorted(sc.errors.items()))
        out.append(f"  {sc.name:9} {sc.calls:>10,} {summary.rate(sc.calls):>9,.0f} "
                   f"{sc.failed:>7,} {duration(sc.ns):>9} {sc.bytes:>15,}  {errs}")
    for sc in summary.syscalls:
        if not sc.sites:
            continue
        out.append(f"  {sc.name} by call site:")
        for ss in sc.sites[:top]:
            failed = f", {ss.errors:,} failed" if ss.errors else ""
            out.append(f"    {ss.calls:>10,} calls {ss.bytes:>15,} B{failed}  {_where(ss.site)}")
    return out


# -- JSON ---------------------------------------------------------------------------------

def to_dict(snap: Snapshot) -> dict[str, Any]:
    """The triage keys of the JSON report (absent when the triage probes did not run)."""
    out: dict[str, Any] = {}
    if snap.locks is not None:
        r = snap.locks
        out["locks"] = {"share_threshold": r.share_threshold,
                        "p99_threshold_ns": r.p99_threshold_ns,
                        "errors": r.errors(),
                        "error_explanations": ERROR_EXPLANATIONS,
                        "locks": [_lock_dict(lk) for lk in r.locks]}
    if snap.syscalls is not None:
        s = snap.syscalls
        out["syscalls"] = [{"syscall": sc.name, "calls": sc.calls,
                            "calls_per_s": round(s.rate(sc.calls), 3), "failed": sc.failed,
                            "errors": sc.errors, "ns": sc.ns, "bytes": sc.bytes,
                            "sites": [{"calls": ss.calls, "failed": ss.errors, "ns": ss.ns,
                                       "bytes": ss.bytes, **_site_dict(ss.site)}
                                      for ss in sc.sites]}
                           for sc in s.syscalls]
    if snap.faults is not None:
        f = snap.faults
        out["faults"] = {"available": f.available, "total": f.total,
                         "sites": [{"faults": fs.faults, **_site_dict(fs.site)}
                                   for fs in f.sites]}
    if snap.triage_loss:
        out["triage_loss"] = snap.triage_loss
    return out


def _lock_dict(lock: Lock) -> dict[str, Any]:
    return {"uaddr": lock.uaddr, "kind": lock.kind, "private": lock.private,
            "contended": lock.contended, "rules": lock.rules, "share": round(lock.share, 6),
            "thread_seconds": round(lock.wait_ns / 1e9, 9),
            "waits": lock.waits, "wait_ns": lock.wait_ns, "max_ns": lock.max_ns,
            "p50_ns": lock.p(0.5), "p99_ns": lock.p(0.99), "hist_log2_ns": lock.hist,
            "wake_calls": lock.wake_calls, "woken": lock.woken, "errors": lock.errors,
            "waiters": [_futex_site_dict(w) for w in lock.waiters],
            "wakers": [_futex_site_dict(w) for w in lock.wakers]}


def _futex_site_dict(fs: FutexSite) -> dict[str, Any]:
    return {"commands": fs.commands, "calls": fs.calls, "ns": fs.ns, "max_ns": fs.max_ns,
            "p50_ns": fs.p(0.5), "p99_ns": fs.p(0.99), "woken": fs.woken,
            "errors": fs.errors, **_site_dict(fs.site)}


def _site_dict(site: CallSite) -> dict[str, Any]:
    frame = site.frame
    return {"label": site.label(), "function": site.function,
            "module": frame.module if frame else None, "via": site.via,
            "lost_stack": site.lost_stack,
            "stack": [f.label() for f in site.frames]}
