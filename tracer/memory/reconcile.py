"""RSS against what allocation tracing accounts for, and who likely owns the rest.

Traced live malloc blocks and the program's own live anonymous mappings explain part
of RSS. The rest is split by what backs it: file mappings, thread stacks, named
anonymous regions, memory glibc's heaps hold beyond the live blocks (retained or
fragmented), and anonymous memory nobody traced (V8's heap in Node, or mappings made
before tracing began). So a user sees at once whether a leak is in malloc'd blocks,
in mappings, or in memory the allocator keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tracer.model.memory import Reconciliation, Share
from tracer.model.sites import Site
from tracer.symbols.attribution import HEAP_MAKERS, made_by

MALLOC_HEAPS = ("heap", "arena")  # backings where malloc's small blocks live


def reconcile(rss_by_backing: Mapping[str, int], sites: Sequence[Site], traced: bool,
              from_start: bool, node: bool) -> Reconciliation:
    """`from_start`: tracing saw every allocation (launched target); `node`: the
    target is a Node.js process, whose untraced anonymous memory is mostly V8's."""
    rss = sum(rss_by_backing.values())
    user = [s for s in sites if not s.allocator_internal]
    malloc = sum(s.bytes for s in user if s.kind == "malloc")
    mapped = sum(s.bytes for s in user if s.kind != "malloc")
    heaps = sum(rss_by_backing.get(b, 0) for b in MALLOC_HEAPS)
    anon = rss_by_backing.get("anonymous", 0)
    shares = [Share("file mappings (code, libraries, mapped files)",
                    rss_by_backing.get("file", 0)),
              Share("thread stacks", rss_by_backing.get("stack", 0))]
    shares += [Share(f"[{b}]", n) for b, n in sorted(rss_by_backing.items())
               if b.startswith("anon:")]
    if traced:
        retained = "allocator-retained or fragmented (malloc heaps beyond live blocks)"
        if not from_start:
            retained += ", or blocks allocated before tracing"
        shares.append(Share(retained, max(heaps - malloc, 0)))
        # big blocks glibc maps one by one count as malloc bytes but live outside heaps
        untraced = max(anon - mapped - max(malloc - heaps, 0), 0)
    else:
        shares.append(Share("malloc heaps (live blocks and allocator-retained)", heaps))
        untraced = anon
    if node:
        what = "V8 heap and other untraced anonymous memory"
    elif traced and not from_start:
        what = "anonymous mappings made before tracing (or by large malloc blocks)"
    else:
        what = "anonymous mappings not traced"
    shares.append(Share(what, untraced))
    shares.append(Share("kernel pages (vdso)", rss_by_backing.get("kernel", 0)))
    return Reconciliation(rss=rss, malloc_bytes=malloc if traced else 0,
                          mmap_bytes=mapped if traced else 0, traced=traced,
                          remainder=sorted((s for s in shares if s.bytes),
                                           key=lambda s: -s.bytes))


def traced_heap_bytes(sites: Sequence[Site]) -> int | None:
    """Bytes the allocator mapped for arena heaps while traced (None: no such stack
    could be named, so tracing cannot confirm the arenas)."""
    found = [s for s in sites if s.allocator_internal and s.kind == "mmap"
             and made_by(s.frames, HEAP_MAKERS)]
    return sum(s.bytes for s in found) if found else None

