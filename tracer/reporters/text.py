"""The human-readable report printed by `run` and `snapshot`."""

from __future__ import annotations

import os
import time

from tracer.model.books import AllocatorBooks, RssSplit, Verdict
from tracer.model.findings import findings
from tracer.model.handles import HandleSite, HandleType
from tracer.model.memory import ArenaSummary, MemoryReport, RegionSummary
from tracer.model.sites import Site
from tracer.model.snapshot import LOSS_DESCRIPTIONS, Snapshot
from tracer.model.unwinding import END_DESCRIPTIONS, Unwinding
from tracer.reporters import triage as triage_report
from tracer.units import format_size as size

STACK_FRAMES_SHOWN = 4


def render(snap: Snapshot, top: int = 10) -> str:
    lines = [_headline(snap)] + [f"Note: {note}" for note in snap.notes]
    found = findings(snap)
    if found:
        lines += ["", "Findings:"] + [f"  * {f}" for f in found] + [""]
    if not snap.allocs:  # triage mode: no malloc probes, the triage sections lead
        lines += triage_report.text_lines(snap, top)[1:]
        if snap.handles:
            lines += [""] + _handles(snap.handles, top)
        if snap.memory is not None:
            lines += [""] + _memory(snap.memory)
        return "\n".join(lines) + "\n"
    user = snap.holding_sites()
    totals = snap.totals()
    total = totals.bytes
    est = "~" if snap.estimated else ""
    lines.append(f"Unfreed: {est}{total:,} bytes in {est}{totals.blocks:,} blocks at "
                 f"{len(user)} call sites" + (f" (allocations older than {snap.min_age:g} s)"
                                              if snap.min_age else ""))
    peak = "" if totals.peak_bytes is None else \
        f"; peak seen {est}{size(totals.peak_bytes)} (sampled once a second)"
    # sampled in the process, a thread's next allocation is seldom seen: whether a block
    # was freed before it (heaptrack's "temporary") cannot be told
    temporary = "temporary ones not measured (sampled)" if snap.in_process else \
        f"{est}{totals.temp_allocs:,} temporary"
    lines.append(f"Allocated while traced: {est}{totals.alloc_bytes:,} bytes in "
                 f"{est}{totals.allocs:,} allocations at {totals.sites} call sites, "
                 f"{temporary}{peak}")
    if snap.in_process:
        mean = f"every {snap.sample_bytes:,} bytes on average" if snap.sample_bytes else \
            "at the period the process chose"
        lines.append(f"Sampled in the process (otel_memory probes), {mean}: figures (~) are "
                     "unbiased estimates; each site shows its samples and 95% interval")
    elif snap.sample_bytes:
        lines.append(f"Sampled: one byte in {snap.sample_bytes:,}; figures (~) are unbiased "
                     "estimates; each site shows its samples and 95% interval")
    if snap.estimated:
        mapped = sum(s.bytes for s in snap.holding_sites() if s.kind != "malloc")
        lines.append(f"  of the unfreed bytes, {mapped:,} in mappings are counted exactly "
                     f"(every mmap is seen), {total - mapped:,} in malloc blocks estimated")
    lines.append("")
    lines += _processes(snap, top)
    lines += _modules(snap, total)
    lines.append("")
    tree = len(snap.processes) > 1
    lines.append(f"Top {min(top, len(user))} call sites by unfreed bytes" +
                 (", all processes:" if tree else ":"))
    lines.append(_SITE_HEADER)
    for site in user[:top]:
        lines += _site(site, total, snap.pid_tag(site))
        interval = site.interval(site.bytes, site.samples, snap.sample_bytes)
        if snap.estimated and site.kind == "malloc" and interval is not None:
            lo, hi = interval
            lines.append(f"  {'':>14} {'':>9} {'':>6} {'':>11}  {'':6} {'':16}   ~ "
                         f"{site.samples:,} samples, 95% interval {lo:,}-{hi:,} bytes")
    lines += _churn(snap, top)
    internal = [s for s in snap.sites if s.allocator_internal]
    if internal:
        lines.append("")
        lines.append("Held by the runtime for itself (malloc arenas and heap, already "
                     "counted as blocks above; thread stacks):")
        for kind, what in (("mmap", "arenas"), ("brk", "heap"), ("stack", "thread stacks")):
            held = [s for s in internal if s.kind == kind]
            if held:
                lines.append(f"  {what:13} {size(sum(s.bytes for s in held)):>12} in "
                             f"{sum(s.blocks for s in held)} ranges")
    if snap.handles:
        lines += [""] + _handles(snap.handles, top)
    lines += triage_report.text_lines(snap, top)
    if snap.memory is not None:
        lines.append("")
        lines += _memory(snap.memory)
    lines.append("")
    lines += _loss(snap)
    lines += _unwinding(snap.unwinding)
    return "\n".join(lines) + "\n"


def _headline(snap: Snapshot) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken_at))
    state = ""
    if snap.target_exited:
        state = ", target exited" + (f" (code {snap.exit_code})"
                                     if snap.exit_code is not None else "")
    return (f"natrace report: PID {snap.pid} ({snap.command}) at {when}, traced "
            f"{snap.duration:.1f} s{state}, mode {snap.mode}")


def _modules(snap: Snapshot, total: int) -> list[str]:
    out = ["Unfreed bytes by module:"]
    for name, nbytes, blocks, sites in snap.by_module():
        if nbytes or blocks:
            out.append(f"  {name:24} {nbytes:>14,} B {_pct(nbytes, total):>6}  "
                       f"{blocks:,} blocks, {sum(1 for s in sites if s.holds)} sites")
    return out


_SITE_HEADER = (f"  {'BYTES':>14} {'BLOCKS':>9} {'%':>6} {'GROWTH/MIN':>11}  {'KIND':6} "
                f"{'MODULE':16} CALL SITE")


def _processes(snap: Snapshot, top: int) -> list[str]:
    """A traced tree: each process on its own (pid, command, its figures, its top
    sites), before the combined view."""
    if len(snap.processes) <= 1:
        return []
    out = [f"Processes traced: {len(snap.processes)}"]
    for proc in snap.processes:
        own = snap.of_process(proc)
        t = own.totals()
        held = own.holding_sites()
        state = ", exited" if proc.exited else ""
        parent = f", child of {proc.parent}" if proc.parent else ""
        out.append(f"  PID {proc.pid} ({proc.command}{parent}{state}): unfreed {t.bytes:,} "
                   f"bytes in {t.blocks:,} blocks at {len(held)} call sites; allocated "
                   f"{t.alloc_bytes:,} bytes in {t.allocs:,} allocations")
        for site in held[:top]:
            out += _site(site, t.bytes)[:1]  # the combined view below has the stacks
    return out + [""]


def _site(site: Site, total: int, tag: str = "") -> list[str]:
    module = site.module_class if site.frame else "-"
    growth = "" if site.per_minute is None else f"{'+' if site.per_minute >= 0 else '-'}" \
        f"{size(abs(site.per_minute))}"
    leak = " LEAK" if site.suspect else ""
    out = [f"  {site.bytes:>14,} {site.blocks:>9,} {_pct(site.bytes, total):>6} {growth:>11}  "
           f"{site.kind:6} {module[:16]:16} {site.label(short=True)}{site.library_via}{leak}"
           f"{tag}"]
    for f in site.frames[site.charge_index + 1: site.charge_index + 1 + STACK_FRAMES_SHOWN]:
        out.append(f"  {'':>14} {'':>9} {'':>6} {'':>11}  {'':6} {'':16}   <- "
                   f"{f.label(short=True)} "
                   f"[{f.module_name}]")
    return out


def _churn(snap: Snapshot, top: int) -> list[str]:
    """The sites that allocate the most (heaptrack's first view), freed or not."""
    busiest = sorted((s for s in snap.user_sites() if s.allocs),
                     key=lambda s: (-s.allocs, -s.alloc_bytes, s.label()))[:top]
    if not busiest:
        return []
    allocs = snap.totals().allocs
    out = ["", f"Top {len(busiest)} call sites by allocations (freed or not; temporary: "
           "freed by the thread before its next allocation):",
           f"  {'ALLOCATIONS':>12} {'%':>6} {'ALLOCATED':>14} {'TEMPORARY':>10} "
           f"{'UNFREED':>14}  {'MODULE':16} CALL SITE"]
    for site in busiest:
        out.append(f"  {site.allocs:>12,} {_pct(site.allocs, allocs):>6} "
                   f"{site.alloc_bytes:>14,} {site.temp_allocs:>10,} {site.bytes:>14,}  "
                   f"{site.module_class[:16]:16} {site.label(short=True)}{site.library_via}"
                   f"{snap.pid_tag(site)}")
    return out


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _loss(snap: Snapshot) -> list[str]:
    lost = {k: v for k, v in snap.loss.items() if v}
    if not lost:
        return ["Nothing lost: every allocation and stack was recorded."]
    out = ["Not recorded (figures above leave these out):"]
    out += [f"  {v:>12,}  {LOSS_DESCRIPTIONS.get(k, k)}" for k, v in lost.items()]
    return out


def _unwinding(unw: Unwinding | None) -> list[str]:
    """Which objects were walked how, and the walks that ended early and why."""
    if unw is None:
        return []
    if unw.mode == "fp":
        return ["Stacks: frame pointers only (--unwind fp): callers in code without them "
                "are missing"]
    by_how: dict[str, list[str]] = {}
    for path, how in sorted(unw.objects.items()):
        by_how.setdefault(how, []).append(os.path.basename(path))
    out = [f"Stacks (--unwind {unw.mode}): "
           + "; ".join(f"{'CFI' if how == 'cfi' else 'frame pointers'}: {', '.join(names)}"
                       for how, names in sorted(by_how.items()))]
    early = unw.early()
    if early:
        out.append(f"  {sum(early.values()):,} of {unw.walks:,} stack walks ended early:")
        out += [f"  {v:>12,}  {END_DESCRIPTIONS.get(k, k)}" for k, v in early.items()]
    return out


def _memory(mem: MemoryReport) -> list[str]:
    out = []
    last, first = mem.last, (mem.timeline[0] if mem.timeline else None)
    if last is not None and first is not None:
        span = last.at - first.at
        out.append(f"Memory ({len(mem.timeline)} samples over {span:.1f} s):")
        line = f"  RSS {size(last.rss)}"
        if len(mem.timeline) > 1:
            line += f" ({_signed(last.rss - first.rss)} since {size(first.rss)})"
        line += f", VMS {size(last.vms)}"
        for name, value in (("USS", last.uss), ("PSS", last.pss), ("swap", last.swap)):
            if value is not None:
                line += f", {name} {size(value)}"
        out.append(line)
        if len(mem.timeline) > 2:
            step = max(1, len(mem.timeline) // 8)
            points = mem.timeline[::step][-8:]
            out.append("  RSS over time: " + " -> ".join(size(s.rss) for s in points))
    if mem.regions is not None:
        out += _regions(mem.regions)
    if mem.arenas is not None:
        out += _arenas(mem.arenas)
    if mem.books is not None:
        out += books_lines(mem.books)
    if mem.split is not None:
        out += _split(mem.split)
    if mem.verdict is not None:
        out += verdict_lines(mem.verdict)
    return out


def _signed(n: int) -> str:
    return ("+" if n >= 0 else "-") + size(abs(n))


def _regions(reg: RegionSummary) -> list[str]:
    line = f"Regions: {reg.regions:,} ({reg.writable:,} writable)"
    if reg.max_map_count is not None and reg.headroom is not None:
        line += f"; vm.max_map_count {reg.max_map_count:,}: {reg.headroom:,} left"
        if reg.headroom < reg.max_map_count // 10:
            line += " (close to the limit: mmap will fail with ENOMEM)"
    out = [line, f"  {'BACKING':22} {'REGIONS':>9} {'SIZE':>12} {'RSS':>12}"]
    out += [f"  {b.backing[:22]:22} {b.regions:>9,} {size(b.size):>12} {size(b.rss):>12}"
            for b in reg.by_backing]
    for title, regions in (("by size", reg.largest_by_size), ("by RSS", reg.largest_by_rss)):
        out.append(f"  Largest {title}:")
        out += [f"    {r.start:#014x}-{r.end:#014x} {r.perms} {size(r.size):>12} "
                f"RSS {size(r.rss):>12}  {r.backing}" + (f" {r.path}" if r.path and
                                                          r.backing == "file" else "")
                for r in regions]
    return out


def _arenas(ar: ArenaSummary) -> list[str]:
    if not ar.heaps:
        return ["glibc arenas: none besides the main arena"]
    threads = f", {ar.threads} threads" if ar.threads is not None else ""
    how = "verified from heap headers" if ar.verified else "from region shapes only"
    out = [f"glibc arenas: {ar.arenas} in {len(ar.heaps)} heaps of 64 MiB "
           f"({size(ar.reserved)} reserved, {size(ar.rss)} resident){threads}; {how}"]
    if ar.traced_heap_bytes is not None:
        out.append(f"  allocation tracing saw the allocator map {size(ar.traced_heap_bytes)} "
                   "for arena heaps")
    if ar.dominates:
        out.append(f"  arenas make up most of {' and '.join(ar.dominates)}")
    return out


def books_lines(books: AllocatorBooks) -> list[str]:
    """The allocator's own books, or one line saying why they could not be read."""
    if not books.readable:
        return [f"Allocator books ({books.allocator}): not read: {books.reason}"]
    out = [f"Allocator books (glibc, read from outside): {len(books.arenas)} arenas, "
           f"{size(books.system_mem)} from the system, {size(books.free)} free "
           f"({size(books.free_resident)} of it in RAM), {size(books.in_use)} in use"]
    if books.torn:
        out.append(f"  ! {len(books.torn)} arenas changed under every read (torn): "
                   "left out, their figures not trusted")
    if books.unwalked:
        out.append(f"  ! {len(books.unwalked)} arenas hold more free chunks than natrace "
                   "walks: left out")
    if books.mmapped_blocks:
        out.append(f"  {books.mmapped_blocks:,} blocks mapped one by one: "
                   f"{size(books.mmapped)} ({size(books.mmapped_resident)} in RAM)")
    threads = f" of {books.threads} threads" if books.threads is not None else ""
    out.append(f"  tcache: {size(books.tcache)} cached in the {len(books.tcaches)} "
               f"tcaches found{threads} (one per arena's first heap)")
    out.append(f"  {'ARENA':>16} {'HEAPS':>5} {'SYSTEM':>11} {'FREE':>11} {'IN RAM':>11} "
               f"{'TOP':>11} {'CHUNKS':>9}")
    out += [f"  {'main' if a.main else hex(a.address):>16} {a.heaps:>5} "
            f"{size(a.system_mem):>11} {size(a.free):>11} {size(a.free_resident):>11} "
            f"{size(a.top):>11} {a.free_chunks:>9,}" for a in books.arenas]
    return out


def _split(sp: RssSplit) -> list[str]:
    out = [f"Where RSS goes ({size(sp.rss)} resident, each part measured):"]
    out += [f"  {size(p.bytes):>12} {_pct(p.bytes, sp.rss):>6}  {p.label} ({p.how})"
            for p in sp.parts]
    if sp.traced_malloc is not None:
        out.append(f"  traced since natrace attached: {size(sp.traced_malloc)} in live malloc "
                   f"blocks, {size(sp.traced_mmap or 0)} in live mappings the program made")
    out += [f"  ! {n}" for n in sp.notes]
    return out


def verdict_lines(v: Verdict) -> list[str]:
    """The verdict, its evidence and the advice the books support."""
    out = [f"Verdict: {v.headline}"]
    out += [f"  - {e}" for e in v.evidence]
    out += [f"  advice: {a}" for a in v.advice]
    return out


def _handles(types: list[HandleType], top: int) -> list[str]:
    out = ["Handles (create/destroy pairs; counts since natrace attached):"]
    for t in types:
        out.append("  " + handle_summary(t))
        line = f"    {t.created:,} created, {t.destroyed:,} destroyed"
        if t.unknown:
            line += f", {t.unknown:,} destroyed that were created before natrace attached"
        if t.stale or t.untracked:
            line += f"; not counted: {t.stale:,} reused without a traced destroy, " \
                    f"{t.untracked:,} over the live-handle limit"
        out.append(line)
        if t.sites:
            out.append(f"    {'LIVE':>9} {'%':>6} {'CREATED':>9} {'OLDEST':>8}  CREATED AT")
            out += [_handle_site(t, h) for h in t.sites[:top]]
    return out


def handle_summary(t: HandleType) -> str:
    """One line per pair: "libpq PGresult: 137 live, +2,100/min, 98% created at
    keep_reports via PQexec; oldest 41 s"."""
    text = f"{t.name}: {t.live:,} live"
    if t.per_minute is not None:
        text += f", {t.per_minute:+,.0f}/min"
    top = t.top
    if top is not None:
        text += f", {100 * t.share(top):.0f}% created at {_created_at(top, short=True)}"
    if t.oldest_age is not None:
        text += f"; oldest {age(t.oldest_age)}"
    return text


def _created_at(h: HandleSite, short: bool = False) -> str:
    """Where a handle was made and through which library function: "keep_reports via
    PQexec" (`short`: the function's name without offset)."""
    via = h.site.via
    where = (h.site.function if short else None) or h.site.label()
    return where + (f" via {via}" if via else "")


def _handle_site(t: HandleType, h: HandleSite) -> str:
    frame = h.site.frame
    oldest = age(h.oldest_age) if h.oldest_age is not None else "-"
    where = f" [{frame.module_name}]" if frame else ""
    return (f"    {h.live:>9,} {_pct(h.live, t.live):>6} {h.created:>9,} {oldest:>8}  "
            f"{_created_at(h)}{where}")


def age(seconds: float) -> str:
    """An age as a person reads it: 41 s, 12 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
