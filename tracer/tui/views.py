"""The tables and header `natrace top` shows, as plain text cells.

Pure functions of a LiveState: the Textual app puts them in widgets, the batch
printer aligns them in columns; neither decides what a row says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tracer.engine.live import LiveState
from tracer.model.callsite import CallSite
from tracer.model.frames import Frame, shorten
from tracer.model.sites import Site, SiteKey
from tracer.units import format_size as size

SPARK = "▁▂▃▄▅▆▇█"
SUSPECT = "LEAK"
UNAVAILABLE = "not available in this mode"


@dataclass(frozen=True)
class Column:
    title: str
    width: int  # characters; 0: takes what is left
    numeric: bool = False


@dataclass
class Row:
    key: str
    cells: tuple[str, ...]
    sort: tuple[float | str, ...]  # one value per column, what sorting compares
    module: str = ""
    stack: list[str] = field(default_factory=list)  # the row's full stack, when it has one

    def matches(self, text: str) -> bool:
        """`module:NAME` matches the module exactly; other text any cell, ignoring case."""
        if text.startswith("module:"):
            return self.module == text[len("module:"):]
        needle = text.lower()
        return any(needle in c.lower() for c in self.cells)


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    empty: str = "nothing yet"


def sorted_rows(rows: list[Row], column: int | None, descending: bool) -> list[Row]:
    """Rows by one column (None: as built, which is each view's ranking)."""
    if column is None:
        return list(rows)
    return sorted(rows, key=lambda r: r.sort[column], reverse=descending)


def filtered_rows(rows: list[Row], text: str) -> list[Row]:
    return [r for r in rows if r.matches(text)] if text else list(rows)


def rate(per_minute: float) -> str:
    if abs(per_minute) < 1:
        return "0"
    return ("+" if per_minute > 0 else "-") + size(abs(per_minute))


def sites_table(state: LiveState) -> Table:
    """Call sites: suspects first (fastest growth first), then by unfreed bytes."""
    rank = {key: i for i, key in enumerate(state.suspects)}
    rows = []
    for key, (site, nbytes, blocks, allocs, pids) in _by_key(state.snapshot.user_sites()).items():
        fit = state.fit(key)
        suspect = key in rank
        name = (shorten(site.frame.symbol) if site.frame and site.frame.symbol
                else site.label()) + site.library_via
        symbol = name if site.kind == "malloc" else f"[{site.kind}] {name}"
        if pids > 1:
            symbol += f" ({pids} processes)"
        rows.append(Row(
            key="\0".join(str(k) for k in key),
            cells=(SUSPECT if suspect else "", size(nbytes), f"{blocks:,}",
                   f"{allocs:,}", rate(fit.per_minute), site.module_class, symbol),
            sort=(rank.get(key, len(rank)), nbytes, blocks, allocs,
                  fit.per_minute, site.module_class, symbol),
            module=site.module_class,
            stack=stack_lines(site.frames, site.charge_index, site.label()),
        ))
    rows.sort(key=lambda r: (r.sort[0], -float(r.sort[1]), -float(r.sort[3])))
    return Table("Call sites", [Column("", 4), Column("UNFREED", 10, True),
                                Column("BLOCKS", 8, True), Column("ALLOCS", 8, True),
                                Column("GROWTH/MIN", 10, True),
                                Column("MODULE", 11), Column("SYMBOL", 0)], rows)


def _by_key(sites: list[Site]) -> dict[SiteKey, tuple[Site, int, int, int, int]]:
    """A function's sites in every traced process as one row, as its growth is fitted
    (engine/live.py): its heaviest site (for the names and stack) and the summed bytes,
    blocks and allocations, and in how many processes it is."""
    out: dict[SiteKey, tuple[Site, int, int, int, int]] = {}
    for s in sites:  # most bytes first: the first of a key represents it
        have = out.get(s.key)
        out[s.key] = (s, s.bytes, s.blocks, s.allocs, 1) if have is None else (
            have[0], have[1] + s.bytes, have[2] + s.blocks, have[3] + s.allocs, have[4] + 1)
    return out


def modules_table(state: LiveState) -> Table:
    rows = []
    for name, nbytes, blocks, sites in state.snapshot.by_module():
        keys = {s.key for s in sites}  # a function in several processes: fitted once
        growth = sum(state.fit(k).per_minute for k in keys)
        leaks = sum(1 for k in keys if k in state.suspects)
        rows.append(Row(
            key=name,
            cells=(name, size(nbytes), f"{blocks:,}", f"{len(sites):,}", rate(growth),
                   f"{leaks:,}" if leaks else ""),
            sort=(name, nbytes, blocks, len(sites), growth, leaks),
            module=name,
        ))
    return Table("Modules", [Column("MODULE", 0), Column("UNFREED", 11, True),
                             Column("BLOCKS", 9, True), Column("SITES", 6, True),
                             Column("GROWTH/MIN", 11, True), Column("LEAKS", 5, True)], rows)


def regions_table(state: LiveState) -> Table:
    """What backs the address space (totals per backing), then the largest regions."""
    columns = [Column("REGION", 27), Column("SIZE", 11, True), Column("RSS", 11, True),
               Column("PERMS", 5), Column("BACKING / PATH", 0)]
    memory = state.snapshot.memory
    summary = memory.regions if memory is not None else None
    if summary is None:
        return Table("Regions", columns, empty=UNAVAILABLE)
    rows = [Row(key=f"backing:{t.backing}",
                cells=(f"{t.regions:,} {t.backing} regions", size(t.size), size(t.rss), "",
                       f"total {t.backing}"),
                sort=("", t.size, t.rss, "", t.backing), module=t.backing)
            for t in summary.by_backing]
    largest = {r.start: r for r in [*summary.largest_by_rss, *summary.largest_by_size]}
    for r in sorted(largest.values(), key=lambda r: (-r.rss, -r.size)):
        rows.append(Row(key=f"{r.start:x}",
                        cells=(f"{r.start:x}-{r.end:x}", size(r.size), size(r.rss), r.perms,
                               f"{r.backing} {r.path}".rstrip()),
                        sort=(f"{r.start:016x}", r.size, r.rss, r.perms, r.backing),
                        module=r.backing))
    return Table("Regions", columns, rows)


def site_label(site: CallSite) -> str:
    if not site.frames:
        return f"[stack not captured: {site.lost_stack}]"
    return site.frames[min(site.charge_index, len(site.frames) - 1)].label()


def ms(ns: int) -> str:
    return f"{ns / 1e6:,.1f}ms"


def locks_table(state: LiveState) -> Table:
    """Futex words some thread waited on, contended first (the triage verdict), by
    blocked thread-seconds."""
    columns = [Column("", 4), Column("LOCK", 16), Column("WAITS", 8, True),
               Column("THREAD-S", 9, True), Column("P99", 9, True), Column("ERRORS", 7, True),
               Column("WAITED IN", 0)]
    report = state.snapshot.locks
    if report is None:
        return Table("Locks", columns, empty=UNAVAILABLE)
    rows = []
    for lock in sorted(report.waited_on(),
                       key=lambda lk: (not lk.contended, -lk.share, -lk.waits)):
        waiter = max(lock.waiters, key=lambda w: w.ns, default=None)
        where = site_label(waiter.site) if waiter else "-"
        errors = sum(lock.errors.values())
        rows.append(Row(
            key=f"{lock.uaddr:x}",
            cells=("HOT" if lock.contended else "", f"{lock.uaddr:x} {lock.kind}",
                   f"{lock.waits:,}", f"{lock.wait_ns / 1e9:.3g}", ms(lock.p(0.99)),
                   f"{errors:,}" if errors else "", where),
            sort=(int(not lock.contended), lock.uaddr, lock.waits, lock.share, lock.p(0.99),
                  errors, where),
            stack=stack_lines(waiter.site.frames, waiter.site.charge_index, where)
            if waiter else [],
        ))
    return Table("Locks (futex words)", columns, rows, empty="no futex waits seen")


def syscalls_table(state: LiveState) -> Table:
    """Memory syscalls like `strace -c`, each followed by its busiest call sites."""
    columns = [Column("SYSCALL", 18), Column("CALLS", 9, True), Column("/S", 7, True),
               Column("FAILED", 7, True), Column("BYTES", 11, True), Column("TIME", 10, True),
               Column("ERRORS", 0)]
    summary = state.snapshot.syscalls
    if summary is None:
        return Table("Memory syscalls", columns, empty=UNAVAILABLE)
    rows = []
    for call in sorted(summary.syscalls, key=lambda c: -c.calls):
        errors = ", ".join(f"{k} {v:,}" for k, v in call.errors.items() if v)
        rows.append(Row(key=call.name,
                        cells=(call.name, f"{call.calls:,}", f"{summary.rate(call.calls):,.0f}",
                               f"{call.failed:,}" if call.failed else "", size(call.bytes),
                               ms(call.ns), errors),
                        sort=(call.name, call.calls, summary.rate(call.calls), call.failed,
                              call.bytes, call.ns, errors)))
        for site in sorted(call.sites, key=lambda x: -x.calls)[:3]:
            where = site_label(site.site)
            rows.append(Row(key=f"{call.name}\0{where}",
                            cells=(f" <- {where}", f"{site.calls:,}",
                                   f"{summary.rate(site.calls):,.0f}",
                                   f"{site.errors:,}" if site.errors else "", size(site.bytes),
                                   ms(site.ns), ""),
                            sort=(call.name, site.calls, summary.rate(site.calls), site.errors,
                                  site.bytes, site.ns, ""),
                            stack=stack_lines(site.site.frames, site.site.charge_index, where)))
    return Table("Memory syscalls", columns, rows, empty="no memory syscalls seen")


def handles_table(state: LiveState) -> Table:
    """Create/destroy pairs (PGresult, PGconn, N-API references, --handle): live handles,
    growth, and the call sites that created the live ones."""
    columns = [Column("HANDLE", 22), Column("LIVE", 9, True), Column("CREATED", 9, True),
               Column("/MIN", 9, True), Column("OLDEST", 8, True), Column("CREATED AT", 0)]
    rows = []
    for handle in state.snapshot.handles:
        growth = handle.per_minute or 0.0
        oldest = handle.oldest_age or 0.0
        rows.append(Row(key=handle.name,
                        cells=(handle.name, f"{handle.live:,}", f"{handle.created:,}",
                               f"{growth:+,.0f}" if handle.per_minute is not None else "",
                               duration(oldest) if handle.oldest_age is not None else "", ""),
                        sort=(handle.name, handle.live, handle.created, growth, oldest, "")))
        for hs in handle.sites[:5]:
            where = site_label(hs.site) + (f" via {hs.site.via}" if hs.site.via else "")
            rows.append(Row(key=f"{handle.name}\0{where}",
                            cells=("", f"{hs.live:,}", f"{hs.created:,}", "",
                                   duration(hs.oldest_age) if hs.oldest_age is not None
                                   else "", where),
                            sort=(handle.name, hs.live, hs.created, 0.0,
                                  hs.oldest_age or 0.0, where),
                            stack=stack_lines(hs.site.frames, hs.site.charge_index, where)))
    return Table("Handles (create/destroy pairs)", columns, rows,
                 empty="no handle pairs traced (libpq, node, or --handle)")


# name -> (key that shows it, builder); the order of the help bar
VIEWS: dict[str, tuple[str, Callable[[LiveState], Table]]] = {
    "sites": ("1", sites_table),
    "modules": ("2", modules_table),
    "locks": ("3", locks_table),
    "syscalls": ("4", syscalls_table),
    "regions": ("5", regions_table),
    "handles": ("6", handles_table),
}


def sparkline(values: list[float], width: int) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARK[0] * len(values)
    scale = (len(SPARK) - 1) / (high - low)
    return "".join(SPARK[round((v - low) * scale)] for v in values)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def header_lines(state: LiveState, paused: bool = False) -> list[str]:
    """Four lines of at most ~80 columns: who and how; the target's memory; what is
    unfreed and suspect; what tracing costs and missed."""
    snap, proc = state.snapshot, state.process
    flags = [f"EXITED ({snap.exit_code})" if state.ended and snap.exit_code is not None
             else "EXITED" if state.ended else "", "PAUSED" if paused else ""]
    up = f" up {duration(proc.uptime)}" if proc.uptime is not None else ""
    first = " ".join(w for w in (f"PID {snap.pid}{up} traced {duration(snap.duration)} "
                                 f"mode {snap.mode}", *flags, f"cmd {snap.command}") if w)
    rss = size(proc.rss[-1]) if proc.rss else "-"
    growth = f" {rate(proc.rss_fit.per_minute)}/min" if proc.rss_fit else ""
    second = f"RSS {rss} {sparkline(proc.rss, 16)}{growth}"
    totals = snap.totals()
    third = (f"unfreed {size(totals.bytes)}  allocated {size(totals.alloc_bytes)} in "
             f"{totals.allocs:,}  leak suspects {len(state.suspects)}")
    memory = snap.memory
    if memory is not None and memory.regions is not None:
        second += f"  regions {memory.regions.regions:,} ({memory.regions.writable:,} w)"
    if memory is not None and memory.arenas is not None:
        third += f"  glibc arenas {memory.arenas.arenas}"
    if memory is not None and memory.verdict is not None:
        books = memory.books
        free = (f" free {size(books.free_resident)}" if books is not None and books.complete
                else "")
        third += f"  verdict {memory.verdict.kind}{free}"
    fourth = (f"events {state.events_per_s:,.0f}/s  lost {state.lost:,}  natrace "
              f"CPU {proc.self_cpu:.0f}% RSS {size(proc.self_rss)}")
    return [first, second, third, fourth]


def stack_lines(frames: list[Frame], charge_index: int, label: str) -> list[str]:
    """Every frame, innermost first, the one the figures are charged to marked `=>`."""
    if not frames:
        return [label]
    out = []
    for i, frame in enumerate(frames):
        mark = "=>" if i == charge_index else "  "
        out.append(f"{mark} #{i:<2} {frame.label()}  [{frame.module_name}]")
    return out

