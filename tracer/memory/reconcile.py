"""RSS split into measured parts, and the verdict: leak, fragmentation/retention, or both.

Every part is measured, none is "the rest": smaps gives the RSS of each backing (heaps,
stacks, files, anonymous); the allocator's books (tracer/memory/books.py) give, inside
the heaps, the free bytes in RAM (pagemap over every free chunk) and the allocator's own
records, and outside them the blocks glibc mapped one by one; V8's heap is the resident
part of the mappings node's own code made (traced mmap call sites, pagemap).

The verdict reads the books over time: live bytes growing is a leak; free bytes the
allocator keeps in RAM, large against RSS, are fragmentation (holes between live
blocks) or retention (free at the top of heaps, not trimmed). Advice names only what the
books support, and points at `natrace whatif` to measure it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tracer.model.books import AllocatorBooks, BooksReading, RssPart, RssSplit, Verdict
from tracer.model.sites import Site
from tracer.symbols.attribution import HEAP_MAKERS, made_by
from tracer.units import format_size as size

MALLOC_HEAPS = ("heap", "arena")  # backings where malloc's heaps live
LEAK_MIN = 1 << 20  # live bytes must grow at least this much...
LEAK_SHARE = 0.02  # ...and by this share of where they started
FRAG_MIN = 16 << 20  # free in RAM inside the allocator: at least this much...
FRAG_SHARE = 0.25  # ...and this share of RSS
TOP_SHARE = 0.5  # free mostly at heap tops: retention, not holes


def split(rss_by_backing: Mapping[str, int], books: AllocatorBooks | None,
          v8_resident: int | None, node: bool, traced_malloc: int | None = None,
          traced_mmap: int | None = None, from_start: bool = True) -> RssSplit:
    """`v8_resident`: RSS of the mappings node's own code made (None: not traced);
    `from_start`: tracing saw every mapping (a launched target)."""
    rss = sum(rss_by_backing.values())
    heaps = sum(rss_by_backing.get(b, 0) for b in MALLOC_HEAPS)
    anonymous = rss_by_backing.get("anonymous", 0)
    parts: list[RssPart] = []
    notes: list[str] = []
    out = RssSplit(rss, parts, traced_malloc=traced_malloc, traced_mmap=traced_mmap,
                   notes=notes)
    if books is not None and books.complete:
        free = min(books.free_resident, heaps)
        overhead = min(books.overhead, heaps - free)
        large = min(books.mmapped_resident, anonymous)
        anonymous -= large
        parts += [
            RssPart("live", "live malloc blocks", heaps - free - overhead,
                    f"heaps' RSS less the free and the allocator's records "
                    f"({size(books.in_use - books.mmapped)} in use by its books)"),
            RssPart("large", "large malloc blocks (mapped one by one)", large,
                    "pagemap over the chunks glibc mapped alone"),
            RssPart("free", "free inside the allocator", free,
                    f"pagemap over {sum(a.free_chunks for a in books.arenas):,} free "
                    f"chunks and the top chunks of {len(books.arenas)} arenas"),
            RssPart("overhead", "allocator overhead (its records, tcache)", overhead,
                    f"books: {len(books.tcaches)} tcaches holding {size(books.tcache)}"),
        ]
        out.free_by_arena = [(a.address, a.free_resident) for a in books.arenas]
    else:
        why = "no books" if books is None else (books.reason or "torn reads")
        if books is not None and books.readable:
            why = _incomplete(books)
        parts.append(RssPart("heaps", "malloc heaps (live and free not split)", heaps, "smaps"))
        notes.append(f"live vs free inside the allocator not measured: {why}")
    if node:
        if v8_resident is None:
            notes.append("V8's heap not measured: it is known from node's traced mmap call "
                         "sites (run or attach with allocation tracing)")
        else:
            v8 = min(v8_resident, anonymous)
            anonymous -= v8
            parts.append(RssPart("v8", "V8/JIT heap (node's own mappings)", v8,
                                 "pagemap over the live mappings node's code made"))
            if not from_start:
                notes.append("V8's mappings made before natrace attached are not known: "
                             "they count as other anonymous memory")
    parts += [
        RssPart("stacks", "thread stacks", rss_by_backing.get("stack", 0), "smaps"),
        RssPart("files", "file mappings (code, libraries, mapped files)",
                rss_by_backing.get("file", 0), "smaps"),
        RssPart("other", "other anonymous memory", anonymous, "smaps"),
    ]
    named = {b: n for b, n in rss_by_backing.items() if b.startswith("anon:") or b == "kernel"}
    parts += [RssPart("other", f"[{b}]", n, "smaps") for b, n in sorted(named.items())]
    out.parts = [p for p in parts if p.bytes or p.key in ("live", "free")]
    return out


def verdict(books: AllocatorBooks | None, readings: Sequence[BooksReading], rss: int,
            command: str | None = None) -> Verdict:
    """What the books say about the process, with the evidence behind it."""
    if books is None or not books.readable:
        why = books.reason if books is not None else "the allocator's books were not read"
        return Verdict("unknown", [why or "books unreadable"])
    if not books.complete:
        return Verdict("unknown", [_incomplete(books)])
    evidence: list[str] = []
    leak = _leak(readings, evidence)
    frag = _fragmentation(books, rss, evidence)
    kind = ("both" if leak and frag else "leak" if leak else "fragmentation" if frag
            else "neither" if leak is not None else "unknown")
    return Verdict(kind, evidence, _advice(books, frag, command))


def _incomplete(books: AllocatorBooks) -> str:
    total = len(books.arenas) + len(books.torn) + len(books.unwalked)
    if books.unwalked:
        return (f"{len(books.unwalked)} of {total} arenas hold more free chunks than natrace "
                f"walks: their figures are not read")
    return (f"{len(books.torn)} of {total} arenas kept changing under every read (torn): "
            f"their figures are not trusted")


def _leak(readings: Sequence[BooksReading], evidence: list[str]) -> bool | None:
    """Live bytes (in use by the books) growing; with three readings or more, still
    growing over the later half (a start-up that levels off is no leak). None: one
    reading, nothing to compare."""
    if len(readings) < 2:
        evidence.append("live bytes read once: growth not judged (watch for longer)")
        return None
    first, mid, last = readings[0], readings[len(readings) // 2], readings[-1]
    grew = last.in_use - first.in_use
    leak = grew >= LEAK_MIN and grew >= LEAK_SHARE * first.in_use
    levelled = leak and len(readings) >= 3 and last.in_use - mid.in_use < LEAK_MIN // 2
    trend = " -> ".join(size(r.in_use) for r in readings[-6:])
    evidence.append(f"live bytes {'grew' if grew >= 0 else 'fell'} {size(abs(grew))} in "
                    f"{last.at - first.at:.1f} s ({len(readings)} readings of the books, "
                    f"last: {trend})" + (", then levelled off" if levelled else ""))
    return leak and not levelled


def _fragmentation(books: AllocatorBooks, rss: int, evidence: list[str]) -> bool:
    free = books.free_resident
    top = sum(a.top for a in books.arenas)
    holes = books.free - top
    in_use = max(books.in_use, 1)
    evidence.append(
        f"{size(free)} free inside glibc's {len(books.arenas)} arenas is in RAM "
        f"({100 * free / rss:.0f}% of RSS; {size(holes)} in "
        f"{sum(a.free_chunks for a in books.arenas):,} chunks between live blocks, "
        f"{size(top)} at the heaps' tops) against {size(books.in_use)} in use "
        f"({books.free / in_use:.1f} free bytes per live byte)" if rss else
        f"{size(free)} free inside the allocator")
    return free >= FRAG_MIN and free >= FRAG_SHARE * rss


def _advice(books: AllocatorBooks, frag: bool, command: str | None) -> list[str]:
    if not frag:
        return []
    top = sum(a.top for a in books.arenas)
    out = []
    measure = f"natrace whatif -- {command}" if command else "natrace whatif -- COMMAND"
    if top >= TOP_SHARE * books.free:
        out.append(f"{size(top)} is free at the top of the heaps: glibc returns what "
                   f"exceeds its trim threshold ({size(books.trim_threshold or 0)}) only "
                   f"when a free reaches the top; malloc_trim(0) returns it now, a lower "
                   f"MALLOC_TRIM_THRESHOLD_ sooner")
        if len(books.arenas) > 2:
            out.append(f"each of the {len(books.arenas)} arenas keeps its own top: "
                       f"MALLOC_ARENA_MAX=2 pools them")
    else:
        out.append(f"{size(books.free - top)} is free in holes between live blocks, which "
                   f"glibc cannot return while the blocks around them live (no "
                   f"MALLOC_ARENA_MAX or trim setting joins them): an allocator that "
                   f"groups blocks by size, such as jemalloc (LD_PRELOAD=libjemalloc.so.2), "
                   f"keeps less")
    out.append(f"measure before changing anything: {measure}")
    return out


def traced_heap_bytes(sites: Sequence[Site]) -> int | None:
    """Bytes the allocator mapped for arena heaps while traced (None: no such stack
    could be named, so tracing cannot confirm the arenas)."""
    found = [s for s in sites if s.allocator_internal and s.kind == "mmap"
             and made_by(s.frames, HEAP_MAKERS)]
    return sum(s.bytes for s in found) if found else None

