"""Raw handle-probe figures -> model HandleTypes.

Creation stacks are symbolized and charged (tracer/engine/callsites.py) to the first
frame outside the pair's own library (and libc/libstdc++), so a PGresult made in
PQmakeEmptyPGresult is charged to the program's function that called PQexec, with PQexec
as its `via`. Sites are grouped
by that function like allocation sites (tracer/engine/aggregator.py's group_by).
"""

from __future__ import annotations

import time
from collections import defaultdict

from tracer.engine.aggregator import group_by
from tracer.engine.callsites import CallSites
from tracer.model.handles import HandleSite, HandleType
from tracer.probes.handles import HandleProbes
from tracer.symbols.attribution import RUNTIME_MODULES, module_class

#: Seconds of live counts below which no growth rate is given (it would be noise).
MIN_GROWTH_SPAN = 10.0


def handle_types(probes: HandleProbes, call_sites: CallSites) -> list[HandleType]:
    """Every traced pair with its counters, growth, oldest handles and creation sites."""
    if not probes.attached:
        return []
    now_ns = time.monotonic_ns()
    stats = probes.pair_stats()
    oldest = probes.oldest()
    raw_by_pair = defaultdict(list)
    for r in probes.sites():
        raw_by_pair[r.pair].append(r)
    out = []
    for tp in probes.pairs:
        s = stats[tp.index]
        if tp.ahead and not (s.created or s.destroyed or s.unknown):
            continue  # a library probed in case the target loads it: it never did
        series = probes.series[tp.index]
        series.add(now_ns / 1e9, s.live)
        growth = series.fit()
        sites = []
        for r in raw_by_pair[tp.index]:
            born = oldest.get((tp.index, r.stack_id))
            age = (now_ns - born) / 1e9 if born is not None else None
            site = call_sites.call_site(r.stack_id, probes.stack,
                                        RUNTIME_MODULES | {module_class(tp.path)},
                                        name_callee=True)
            sites.append(HandleSite(site, r.live, r.created, age))
        grouped = group_by(sites, lambda h: h.site.key, lambda h: h.live, _merge)
        live_sites = sorted((h for h in grouped if h.live > 0),
                            key=lambda h: (-h.live, -h.created, h.site.label()))
        ages = [h.oldest_age for h in live_sites if h.oldest_age is not None]
        out.append(HandleType(
            name=tp.pair.name, library=tp.path, create=list(tp.pair.create),
            destroy=tp.pair.destroy, destroy_arg=tp.pair.destroy_arg, preset=tp.pair.preset,
            created=s.created, destroyed=s.destroyed, unknown=s.unknown, live=s.live,
            stale=s.stale, untracked=s.untracked,
            per_minute=growth.per_minute if growth.span >= MIN_GROWTH_SPAN else None,
            oldest_age=max(ages) if ages else None, sites=live_sites))
    return out



def _merge(have: HandleSite, other: HandleSite, heavier: bool) -> None:
    if heavier:  # the stack with most live handles represents the group
        have.site = other.site
    have.live += other.live
    have.created += other.created
    if other.oldest_age is not None:
        have.oldest_age = max(have.oldest_age or 0.0, other.oldest_age)
