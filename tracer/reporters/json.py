"""`--json`: the report as one JSON document (shape documented in docs/report-json.md).

Every list adds up to its total: `sites` (the program's call sites) and `modules` sum
to `totals`; the runtime's own memory (malloc arenas and heap growth, thread stacks)
is in `runtime` with totals of its own, never mixed in.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from tracer.model.callsite import CallSite
from tracer.model.findings import findings
from tracer.model.frames import Frame
from tracer.model.handles import HandleType
from tracer.model.memory import MemoryReport, Region
from tracer.model.sites import Site
from tracer.model.snapshot import Snapshot
from tracer.reporters import triage as triage_report

FORMAT_VERSION = 4


def to_dict(snap: Snapshot) -> dict[str, Any]:
    period = snap.sample_bytes if snap.estimated else None
    return {
        "format": "natrace-report",
        "version": FORMAT_VERSION,
        "pid": snap.pid,
        "command": snap.command,
        "taken_at": snap.taken_at,
        "duration": round(snap.duration, 3),
        "mode": snap.mode,
        "sample_bytes": snap.sample_bytes,
        "in_process": snap.in_process,
        "min_age": snap.min_age,
        "target_exited": snap.target_exited,
        "exit_code": snap.exit_code,
        "notes": snap.notes,
        "totals": asdict(snap.totals()),
        "findings": findings(snap),
        "modules": _modules(snap),
        "sites": [_site(s, period, snap.pid) for s in snap.user_sites()],
        "processes": [_process(snap.of_process(p), period) for p in snap.traced_processes()],
        "runtime": _runtime(snap.runtime_sites()),
        "loss": snap.loss,
        "calls": snap.calls,
        "memory": _memory(snap.memory) if snap.memory is not None else None,
        "handles": [_handle_type(t) for t in snap.handles],
        "unwinding": asdict(snap.unwinding) if snap.unwinding is not None else None,
        **triage_report.to_dict(snap),
    }


def _modules(snap: Snapshot) -> list[dict[str, Any]]:
    return [{"module": name, "bytes": b, "blocks": n, "sites": len(sites),
             "holding_sites": sum(1 for s in sites if s.holds),
             "allocs": sum(s.allocs for s in sites),
             "alloc_bytes": sum(s.alloc_bytes for s in sites),
             "temp_allocs": sum(s.temp_allocs for s in sites),
             "temp_bytes": sum(s.temp_bytes for s in sites)}
            for name, b, n, sites in snap.by_module()]


def _process(snap: Snapshot, period: int | None) -> dict[str, Any]:
    """One traced process (`snap` narrowed to it): its own totals, modules and sites."""
    proc = snap.processes[0]
    return {"pid": proc.pid, "command": proc.command, "parent": proc.parent or None,
            "exited": proc.exited, "followed": proc.followed,
            "totals": asdict(snap.totals()), "modules": _modules(snap),
            "sites": [_site(s, period, snap.pid) for s in snap.user_sites()]}


def _runtime(sites: list[Site]) -> dict[str, Any]:
    """The runtime's own memory by kind (mmap: arena heaps, brk: heap growth, stack:
    thread stacks); `blocks` are address ranges."""
    return {"totals": {"bytes": sum(s.bytes for s in sites),
                       "blocks": sum(s.blocks for s in sites), "sites": len(sites)},
            "sites": [_site(s, None) for s in sites]}


def _site(site: Site, period: int | None, pid: int = 0) -> dict[str, Any]:
    """`period`: sampled in the process with this mean (0: the process's own), else None.
    `pid`: the snapshot's own process, for sites that name none."""
    frame = site.frame
    return {
        **(_sampling(site, period) if period is not None else {}),
        "pid": site.pid or pid or None,
        "kind": site.kind,
        "bytes": site.bytes,
        "blocks": site.blocks,
        "allocs": site.allocs,
        "alloc_bytes": site.alloc_bytes,
        "temp_allocs": site.temp_allocs,
        "temp_bytes": site.temp_bytes,
        "first_at": site.first_at,
        "last_at": site.last_at,
        "allocator_internal": site.allocator_internal,
        "label": site.label(),
        "function": frame.symbol if frame else None,
        "module": frame.module if frame else None,
        "module_class": site.module_class,
        "lost_stack": site.lost_stack,
        "charge_index": site.charge_index,
        "library_index": site.library_index,
        "via": site.via,
        "per_minute": site.per_minute,
        "suspect": site.suspect,
        "stack": [_frame(f) for f in site.frames],
    }


def _sampling(site: Site, period: int) -> dict[str, Any]:
    """How many samples each estimate stands on, and its 95% interval."""
    return {
        "samples": site.samples,
        "alloc_samples": site.alloc_samples,
        "bytes_interval": _list(site.interval(site.bytes, site.samples, period)),
        "blocks_interval": _list(site.interval(site.blocks, site.samples, period)),
        "alloc_bytes_interval": _list(site.interval(site.alloc_bytes, site.alloc_samples,
                                                    period)),
    }


def _list(pair: tuple[int, int] | None) -> list[int] | None:
    return list(pair) if pair is not None else None


def _memory(mem: MemoryReport) -> dict[str, Any]:
    """Samples, regions, arenas, books, the RSS split and the verdict as plain values
    (bytes throughout)."""
    reg, ar, books, sp, v = mem.regions, mem.arenas, mem.books, mem.split, mem.verdict
    return {
        "timeline": [asdict(s) for s in mem.timeline],
        "regions": None if reg is None else {
            "count": reg.regions, "writable": reg.writable,
            "max_map_count": reg.max_map_count, "headroom": reg.headroom,
            "by_backing": [asdict(b) for b in reg.by_backing],
            "largest_by_size": [_region(r) for r in reg.largest_by_size],
            "largest_by_rss": [_region(r) for r in reg.largest_by_rss],
        },
        "arenas": None if ar is None else {
            "arenas": ar.arenas, "heaps": len(ar.heaps), "reserved": ar.reserved,
            "rss": ar.rss, "threads": ar.threads, "verified": ar.verified,
            "dominates": ar.dominates,
            "traced_heap_bytes": ar.traced_heap_bytes,
            "heap_list": [asdict(h) for h in ar.heaps],
        },
        "books": None if books is None else {
            **asdict(books), "system_mem": books.system_mem, "free": books.free,
            "free_resident": books.free_resident, "tcache": books.tcache,
            "in_use": books.in_use, "overhead": books.overhead, "complete": books.complete,
            "arenas": [{**asdict(a), "free": a.free} for a in books.arenas],
        },
        "books_timeline": [asdict(r) for r in mem.books_timeline],
        "split": None if sp is None else asdict(sp),
        "verdict": None if v is None else {**asdict(v), "headline": v.headline},
    }


def _region(r: Region) -> dict[str, Any]:
    return {**asdict(r), "size": r.size}


def _handle_type(t: HandleType) -> dict[str, Any]:
    """One create/destroy pair; ages in seconds, growth in live handles per minute."""
    return {
        "name": t.name, "library": t.library, "create": t.create, "destroy": t.destroy,
        "destroy_arg": t.destroy_arg, "preset": t.preset, "created": t.created,
        "destroyed": t.destroyed, "destroyed_unknown": t.unknown, "live": t.live,
        "stale": t.stale, "untracked": t.untracked, "per_minute": t.per_minute,
        "oldest_age": t.oldest_age,
        "sites": [{"live": h.live, "created": h.created, "oldest_age": h.oldest_age,
                   **_call_site(h.site)} for h in t.sites],
    }


def _call_site(site: CallSite) -> dict[str, Any]:
    frame = site.frame
    return {"label": site.label(), "function": site.function, "via": site.via,
            "module": frame.module if frame else None,
            "module_class": frame.module_class if frame else "unknown",
            "lost_stack": site.lost_stack, "charge_index": site.charge_index,
            "stack": [_frame(f) for f in site.frames]}


def _frame(f: Frame) -> dict[str, Any]:
    return {"address": f.address, "module": f.module, "module_offset": f.module_offset,
            "module_class": f.module_class, "symbol": f.symbol,
            "symbol_offset": f.symbol_offset, "file": f.file, "line": f.line,
            "inlined": f.inlined, "label": f.label()}


def render(snap: Snapshot) -> str:
    return json.dumps(to_dict(snap), indent=2) + "\n"
